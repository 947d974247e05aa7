"""The ``tvm-sparse`` command line: inspect, compile, tune, run / bench over RPC, demo.

Each command imports what it runs: importing TVM takes seconds, which ``--help`` and usage
errors do not wait for.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .errors import TvmSparseError


def _shape(text: str) -> tuple[int, ...]:
    """``--input-shape``: "1,3,224,224" or "1x3x224x224"."""
    dims = text.replace("x", ",").split(",")
    if not all(d.strip().isdigit() and int(d) > 0 for d in dims):
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 1,3,224,224), got {text!r}"
        )
    return tuple(int(d) for d in dims)


def _positive_int(text: str) -> int:
    if not text.strip().lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.strip().lstrip("+").isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``tvm-sparse: error: ...``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog.removeprefix("tvm-sparse").strip()
        where = f"{where}: " if where else ""
        self.exit(2, f"tvm-sparse: error: {where}{message} (see {self.prog} --help)\n")


def _load(args: argparse.Namespace):
    """The model and example inputs a subcommand names (ONNX file, .pt2 file or builtin:NAME)."""
    import numpy as np

    model = args.model
    inputs = None
    if args.input_shape:
        inputs = (np.zeros(args.input_shape, dtype="float32"),)
    if model.startswith("builtin:"):
        groups = {"builtin:resnet18-pattern": 1, "builtin:resnet18-pattern-g4": 4}
        sequence = ("builtin:gru-bcr", "builtin:bert-bsr")
        if model in sequence:
            from .sequence_models import BUILTINS

            model, example = BUILTINS[model]()
            return model, inputs or example
        if model not in groups:
            names = ", ".join([*groups, *sequence])
            raise TvmSparseError(f"unknown built-in model {model!r} ({names})")
        from .demo import build_demo_model

        model = build_demo_model(filter_group=groups[model])
        inputs = inputs or (np.zeros((1, 3, 224, 224), dtype="float32"),)
    return model, inputs


def cmd_inspect(args: argparse.Namespace) -> int:
    from .compiler import analyze

    model, inputs = _load(args)
    print(analyze(model, inputs, target=args.target))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .compiled_model import check_export_path
    from .compiler import compile as compile_model

    check_export_path(args.output)  # before minutes of compiling
    model, inputs = _load(args)
    cm = compile_model(
        model, inputs, target=args.target, sparse=not args.dense, tuning=args.tuning, verbose=True
    )
    print(cm.report())
    path = cm.export(args.output)
    print(f"wrote {path} and {path}.json")
    return 0


def _remote(args: argparse.Namespace):
    from .rpc import connect

    if args.rpc is None:
        raise TvmSparseError("--rpc HOST:PORT (a tracker, with --key) is required")
    if args.key:
        return connect(tracker=args.rpc, key=args.key)
    host, port = args.rpc.rsplit(":", 1)
    return connect(host=host, port=int(port))


def cmd_remote(args: argparse.Namespace) -> int:
    """Compile for the device, run (and time) it there, compare with a host build."""
    import numpy as np

    from .compiler import compile as compile_model
    from .frontend import random_inputs
    from .rpc import benchmark_remote, run_remote

    model, inputs = _load(args)
    device = compile_model(model, inputs, target=args.target, tuning=args.tuning, verbose=True)
    host = compile_model(model, inputs, target="x86")
    feed = random_inputs(device.inputs)
    expected = host(*feed)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    with _remote(args) as remote:
        got = run_remote(device.executable, feed, remote, target=device.target)
        err = max(float(np.max(np.abs(g - e))) for g, e in zip(got, expected, strict=True))
        print(f"{remote}: max |device - host| = {err:.2e}")
        if args.command == "bench":
            ms = benchmark_remote(device.executable, feed, remote, target=device.target,
                                  repeat=args.repeat)  # fmt: skip
            print(f"{remote}: median {ms:.3f} ms per run ({args.repeat} repeats)")
    return 0 if err <= 1e-3 * max(1.0, max(float(np.abs(e).max()) for e in expected)) else 1


def cmd_tune(args: argparse.Namespace) -> int:
    """Tune every kernel of the model (resumable: rerun with the same --work-dir)."""
    from .tuning import tune

    model, inputs = _load(args)
    result = tune(
        model,
        inputs,
        target=args.target,
        trials=args.trials,
        work_dir=args.work_dir,
        rpc=args.rpc,
        key=args.key or "android",
        tvm_kernels=not args.sparse_only,
        verify=args.verify,
        model_check=not args.no_model_check,
    )
    print(result.table())
    print(f"records in {result.work_dir} ({result.seconds:.0f} s); use them with "
          f"`tvm-sparse compile ... --tuning {result.work_dir}`")  # fmt: skip
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    """Measure the block-format cost table for a target on this host (a minute or two)."""
    from .cost_model import refresh_cost_table

    print(f"wrote {refresh_cost_table(args.target, args.family)}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Compile for this host and print where a forward pass spends its time, per kernel."""
    from .compiler import compile as compile_model
    from .frontend import random_inputs

    model, inputs = _load(args)
    cm = compile_model(model, inputs, sparse=not args.dense, tuning=args.tuning, verbose=True)
    feed = random_inputs(cm.inputs)
    print(cm.profile(*feed, runs=args.runs).table(top=args.top))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model != "resnet18":
        from .demo_sequence import run_sequence_demo

        run_sequence_demo(args.model, rounds=args.rounds, threads=args.threads)
        return 0
    from .demo import run_demo

    run_demo(
        image=args.image,
        width=args.width,
        rounds=args.rounds,
        filter_group=args.filter_group,
        threads=args.threads,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tvm-sparse", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            help="ONNX file, torch.export .pt2 file, or builtin:resnet18-pattern[-g4] | "
            "builtin:gru-bcr (2-layer GRU, W_hh at 10%% of 8x8 blocks) | builtin:bert-bsr "
            "(4-layer encoder, 10%% of 16x1 blocks)",
        )
        p.add_argument(
            "--input-shape", type=_shape, help="e.g. 1,3,224,224 (ONNX files carry their own)"
        )
        p.add_argument(
            "--target",
            default="x86",
            help="x86 (this host), x86-avx2, x86-avx512, arm64, android, or 'llvm -mcpu=...'",
        )

    p = sub.add_parser("inspect", help="sparsity report: format chosen per layer, no build")
    model_args(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("compile", help="compile and export a deployable library")
    model_args(p)
    p.add_argument("-o", "--output", required=True, help="library path (.so); metadata: OUT.json")
    p.add_argument("--dense", action="store_true", help="ignore sparsity (dense baseline)")
    p.add_argument("--tuning", help="a tune work directory: apply its best records")
    p.set_defaults(func=cmd_compile)
    p = sub.add_parser("tune", help="MetaSchedule-tune every kernel; records resume on rerun")
    model_args(p)
    p.add_argument("--trials", type=_positive_int, default=200, help="measurements in all")
    p.add_argument("--work-dir", default="tvm-sparse-tuning", help="records (JSON database)")
    p.add_argument("--rpc", help="measure on a device: tracker HOST:PORT (with --key)")
    p.add_argument("--key", help="device key registered with the tracker (default android)")
    p.add_argument("--sparse-only", action="store_true", help="skip TVM's own kernels")
    p.add_argument("--verify", type=_count, default=3,
                   help="re-time each task's best N records and its default, keep the fastest "
                        "(0: trust one measurement per candidate)")  # fmt: skip
    p.add_argument("--no-model-check", action="store_true",
                   help="skip comparing tuned and default kernels inside the model")  # fmt: skip
    p.set_defaults(func=cmd_tune)
    for name, text in (("run", "run on a device over RPC and compare with the host"),
                       ("bench", "run, compare and time on a device over RPC")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        model_args(p)
        p.set_defaults(target="arm64")
        p.add_argument("--rpc", help="tracker HOST:PORT (with --key) or server HOST:PORT")
        p.add_argument("--key", help="device key registered with the tracker (e.g. android)")
        p.add_argument("--repeat", type=_positive_int, default=5)
        p.add_argument("--tuning", help="a tune work directory: apply its best records")
        p.set_defaults(func=cmd_remote)
    p = sub.add_parser("costs", help="measure the block-format cost table of this CPU")
    p.add_argument("--target", default="x86", help="x86, x86-avx2, x86-avx512 or an LLVM target")
    p.add_argument("--family", action="store_true",
                   help="store it as the ISA family's fallback table (avx512 / avx2)")  # fmt: skip
    p.set_defaults(func=cmd_costs)
    p = sub.add_parser("profile", help="time every kernel of a forward pass on this host")
    model_args(p)
    p.add_argument("--dense", action="store_true", help="ignore sparsity (dense baseline)")
    p.add_argument("--tuning", help="a tune work directory: apply its best records")
    p.add_argument("--runs", type=_positive_int, default=10)
    p.add_argument("--top", type=_count, default=0, help="only the N slowest kernels")
    p.set_defaults(func=cmd_profile)
    p = sub.add_parser("demo", help="pruned ResNet-18: sparse vs dense vs PyTorch vs ONNX Runtime")
    p.add_argument("--model", default="resnet18", choices=["resnet18", "gru-bcr", "bert-bsr"],
                   help="gru-bcr / bert-bsr: a block-pruned GRU / encoder vs ONNX Runtime and "
                        "PyTorch (--image, --width, --filter-group apply to resnet18)")  # fmt: skip
    p.add_argument("--image", type=_positive_int, default=224, help="input height and width")
    p.add_argument("--width", type=_positive_int, default=64, help="channels of the first stage")
    p.add_argument("--rounds", type=_positive_int, default=15)
    p.add_argument(
        "--filter-group",
        type=_positive_int,
        default=1,
        help="patterns + connectivity per group of filters",
    )
    p.add_argument("--threads", type=_positive_int, help="PyTorch / ONNX Runtime threads")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Every error is one line on stderr and exit code 2 (``--debug``: the
    traceback too); Ctrl-C exits with 130."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("tvm-sparse: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (the CLI's one place that reports every failure)
        if args.debug:
            traceback.print_exc()
        print(f"tvm-sparse: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """The error as one line: the project's own errors as they are, others with their type
    and the last line of TVM's multi-line messages."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if isinstance(err, TvmSparseError):
        return " ".join(lines) if len(lines) <= 3 else text
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or text}"
    hint = " (rerun with --debug for the traceback)"
    return f"{type(err).__name__}: {text}{hint}" if text else f"{type(err).__name__}{hint}"


if __name__ == "__main__":
    sys.exit(main())
