"""Fuzz ``tvm_sparse.compile`` with random small pruned CNNs (``tvm_sparse.fuzzing``) against
PyTorch: the long run of ``tests/test_fuzz_models.py``'s strategy.

Every example is compiled, run on a seeded input and compared with PyTorch within
``tvm_sparse.fuzzing.TOLERANCE`` (relative to the output magnitude, times sqrt(depth)); failures
(mismatches and errors) are collected, not raised, so the run goes on.

    python benchmarks/fuzz_models.py --examples 200 [--seed 0] [--wide-every 5] [--shrink]
    python benchmarks/fuzz_models.py --examples 60 --kinds chain --wide-every 1  # staged pairs
    python benchmarks/fuzz_models.py --replay '<spec JSON from a summary>'

Examples are drawn in hypothesis runs of ``--chunk`` examples, seeded from ``--seed``.
``--shrink``: afterwards, rerun the first failure's chunk until that failure and let hypothesis
shrink it (to a failure of the same kind). Writes benchmarks/results/fuzz_models.{json,md}:
examples run, failures with their description and reproducing JSON, kernel and format coverage.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import warnings

from hypothesis import HealthCheck, Phase, given, seed, settings

from tvm_sparse.benchmarking import markdown_table, write_results
from tvm_sparse.fuzzing import FuzzResult, ModelSpec, check_spec, model_specs
from tvm_sparse.fuzzing.strategy import KINDS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "fuzz_models")


def failure_kind(result: FuzzResult) -> str:
    """What kind of failure: the error type and where it was raised, or "mismatch"."""
    if result.error is None:
        return "mismatch"
    return result.error.split(":", 1)[0] + " " + result.error.rsplit("(at ", 1)[-1].rstrip(")")


def fuzz(args: argparse.Namespace, on_result, phases: tuple, run_seed: int, examples: int) -> None:
    """Run hypothesis over ``model_specs`` calling ``on_result(result)`` per example."""
    kinds = tuple(args.kinds.split(","))
    strategy = model_specs(args.max_layers, wide_every=args.wide_every, kinds=kinds)

    @seed(run_seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(strategy)
    def run(spec: ModelSpec) -> None:
        on_result(check_spec(spec, target=args.target))

    run()


def run_all(args: argparse.Namespace) -> list[FuzzResult]:
    results: list[FuzzResult] = []

    def record(result: FuzzResult) -> None:
        results.append(result)
        mark = "  " if result.ok else "!!"
        print(f"{mark} {len(results):4d} {result.seconds:5.1f}s {result.summary()}", flush=True)
        print(f"        {result.spec.describe()}", flush=True)

    for chunk, start in enumerate(range(0, args.examples, args.chunk)):
        count = min(args.chunk, args.examples - start)
        fuzz(args, record, (Phase.generate,), chunk_seed(args, chunk), count)
    return results


def chunk_seed(args: argparse.Namespace, chunk: int) -> int:
    """Each chunk of examples is a hypothesis run of its own seed (hypothesis mutates the
    examples of one run into near-copies: several short runs spread wider)."""
    return args.seed * 10_000 + chunk


def shrink_first_failure(args: argparse.Namespace, index: int, kind: str) -> FuzzResult | None:
    """Rerun the chunk of example ``index`` until a failure of ``kind``; hypothesis shrinks
    it."""
    shrunk: list[FuzzResult] = []

    def fail(result: FuzzResult) -> None:
        if not result.ok and failure_kind(result) == kind:
            shrunk.append(result)
            print(f"   shrinking: {result.spec.describe()}", flush=True)
            raise AssertionError(result.summary())

    try:
        chunk = index // args.chunk
        fuzz(args, fail, (Phase.generate, Phase.shrink), chunk_seed(args, chunk), args.chunk)
    except AssertionError:
        return shrunk[-1] if shrunk else None
    return None


def summarize(args, results: list[FuzzResult], shrunk: FuzzResult | None, seconds: float):
    failures = [r for r in results if not r.ok]
    kinds = collections.Counter(failure_kind(r) for r in failures)
    kernels = collections.Counter(k for r in results for k in r.kernels)
    formats = collections.Counter(f for r in results for f in r.formats)
    payload = {
        "command": " ".join(sys.argv),
        "examples": len(results),
        "failures": len(failures),
        "failure_kinds": dict(kinds),
        "seconds": round(seconds, 1),
        "kernels": dict(kernels.most_common()),
        "formats": dict(formats.most_common()),
        "failed": [r.to_json() for r in failures],
        "shrunk": shrunk.to_json() if shrunk else None,
    }
    md = [
        f"`{payload['command']}`: {len(results)} random models, {len(failures)} failed, "
        f"{seconds:.0f} s (tolerance: `tvm_sparse.fuzzing.TOLERANCE`).\n",
        "Kernels called (models):\n",
        markdown_table(["kernel", "models"], [[k, n] for k, n in kernels.most_common()]),
        "\nLayer formats (layers):\n",
        markdown_table(["op:format", "layers"], [[k, n] for k, n in formats.most_common()]),
    ]
    if failures:
        md += ["\nFailures:\n"]
        md += [
            f"- {r.summary()}\n  `{r.spec.describe()}`\n  `{r.spec.to_json()}`" for r in failures
        ]
    if shrunk:
        md += [f"\nShrunk first failure: {shrunk.summary()}\n  `{shrunk.spec.to_json()}`"]
    return payload, "\n".join(md)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-layers", type=int, default=4)
    parser.add_argument("--wide-every", type=int, default=5, help="one map in N is 40-80 wide")
    parser.add_argument("--kinds", default=",".join(KINDS), help="feature layer kinds drawn")
    parser.add_argument("--chunk", type=int, default=20, help="examples per hypothesis run")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--shrink", action="store_true", help="shrink the first failure")
    parser.add_argument("--replay", help="check one spec (its JSON) and print the result")
    parser.add_argument("--out", default=RESULTS, help="results stem (.json / .md added)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.replay:
        result = check_spec(ModelSpec.from_json(args.replay), target=args.target)
        print(result.spec.describe(), "\n", result.summary(), "\n", result.formats, result.kernels)
        sys.exit(0 if result.ok else 1)
    t0 = time.perf_counter()
    results = run_all(args)
    failed = [i for i, r in enumerate(results) if not r.ok]
    shrunk = None
    if args.shrink and failed:
        shrunk = shrink_first_failure(args, failed[0], failure_kind(results[failed[0]]))
    payload, md = summarize(args, results, shrunk, time.perf_counter() - t0)
    paths = write_results(args.out, payload, md)
    print(f"{len(results)} examples, {len(failed)} failures; wrote {', '.join(paths)}")


if __name__ == "__main__":
    main()
