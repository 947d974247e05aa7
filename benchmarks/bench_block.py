"""Block-sparse FC and 1x1 conv layers: tvm-sparse vs dense PyTorch / ONNX Runtime / TVM dense.

    python3 benchmarks/bench_block.py                 # -> benchmarks/results/block_layers.*
    python3 benchmarks/bench_block.py --bcr --out benchmarks/results/bcr_layers
    python3 benchmarks/bench_block.py --refresh-costs # = tvm-sparse costs

Layers: the FC and 1x1 conv shapes of ResNet-50, MobileNetV2 and VGG-16 (batch 1), weights
BSR-pruned (``tvm_sparse.prune.project_bsr``) to 50 / 80 / 90 % block sparsity, each a one-layer
model (1x1 conv + bias + ReLU, or linear + bias) compiled with ``tvm_sparse.compile`` (the format
is its per-layer choice) and with ``sparse=False`` ("TVM dense"); all runtimes with 2 threads,
medians of interleaved rounds, outputs checked against PyTorch.

``--refresh-costs`` re-measures this CPU's cost table (``tvm_sparse.cost_model``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

THREADS = 2
SPARSITIES = (0.5, 0.8, 0.9)
# The hand-picked subset (--subset); the default is every shape of the models (``model_layers``).
# (name, K, N) -- batch-1 classifiers.
FC_LAYERS = [
    ("resnet50.fc", 2048, 1000),
    ("mobilenetv2.classifier", 1280, 1000),
    ("vgg16.fc7", 4096, 4096),
    ("vgg16.fc8", 4096, 1000),
]
# (name, C_in, C_out, H=W, stride)
CONV_LAYERS = [
    ("resnet50.layer1.conv1", 256, 64, 56, 1),
    ("resnet50.layer1.conv3", 64, 256, 56, 1),
    ("resnet50.layer2.downsample", 256, 512, 56, 2),
    ("resnet50.layer2.conv3", 128, 512, 28, 1),
    ("resnet50.layer3.conv1", 1024, 256, 14, 1),
    ("resnet50.layer4.conv3", 512, 2048, 7, 1),
    ("mobilenetv2.expand_24", 24, 144, 56, 1),
    ("mobilenetv2.project_576", 576, 96, 14, 1),
    ("mobilenetv2.last_1x1", 320, 1280, 7, 1),
]


def model_layers() -> tuple[list, list]:
    """Every distinct FC and 1x1 conv shape of ResNet-50, MobileNetV2 and VGG-16 (224x224,
    batch 1), named by its first occurrence (``xN`` when the shape repeats), in model order."""
    import torch

    from tvm_sparse.models import mobilenet_v2, resnet50, vgg16

    fcs, convs, seen = [], [], {}
    for model_name, make in (("resnet50", resnet50), ("mobilenetv2", mobilenet_v2),
                             ("vgg16", vgg16)):  # fmt: skip
        net = make().eval()
        hooks = []
        for name, mod in net.named_modules():
            is_1x1 = isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1)
            if not (is_1x1 or isinstance(mod, torch.nn.Linear)):
                continue

            def hook(mod, inputs, _out, name=f"{model_name}.{name}"):
                if isinstance(mod, torch.nn.Linear):
                    key = ("fc", mod.in_features, mod.out_features)
                    row = [name, mod.in_features, mod.out_features]
                    target = fcs
                else:
                    hw, stride = inputs[0].shape[-1], mod.stride[0]
                    key = ("conv", mod.in_channels, mod.out_channels, hw, stride)
                    row = [name, mod.in_channels, mod.out_channels, hw, stride]
                    target = convs
                if key in seen:
                    seen[key][0] = seen[key][0].split(" x")[0] + f" x{int(seen[key][1]) + 1}"
                    seen[key][1] += 1
                    return
                entry = [row[0], 1]
                seen[key] = entry
                target.append((entry, row[1:]))

            hooks.append(mod.register_forward_hook(hook))
        with torch.no_grad():
            net(torch.zeros(1, 3, 224, 224))
        for h in hooks:
            h.remove()
    fc_layers = [(entry[0], *rest) for entry, rest in fcs]
    conv_layers = [(entry[0], *rest) for entry, rest in convs]
    return fc_layers, conv_layers


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ layer bench


def _layer_model(kind: str, shape: tuple, sparsity: float, block, seed: int, bcr: bool = False):
    import torch
    from torch import nn

    from tvm_sparse.prune import project_bcr, project_bsr

    torch.manual_seed(seed)
    if kind == "fc":
        _, k, n = shape
        model = nn.Linear(k, n)
        x = np.random.default_rng(seed).standard_normal((1, k)).astype("float32")
    else:
        _, c, o, hw, stride = shape
        conv = nn.Conv2d(c, o, 1, stride=stride)
        model = nn.Sequential(conv, nn.ReLU())
        x = np.random.default_rng(seed).standard_normal((1, c, hw, hw)).astype("float32")
    layer = model if kind == "fc" else model[0]
    with torch.no_grad():
        if bcr:  # GRIM: inside each block, keep sqrt(1 - sparsity) of its rows and of its columns
            keep = float(np.sqrt(1.0 - sparsity))
            layer.weight.copy_(project_bcr(layer.weight, block, keep, keep))
        else:
            layer.weight.copy_(project_bsr(layer.weight, block, 1.0 - sparsity))
        layer.bias.uniform_(-0.1, 0.1)
    return model.eval(), x


def run_layers(
    fc_block,
    conv_block,
    rounds: int,
    only: str | None,
    layers_from: str = "models",
    bcr: bool = False,
    tune_trials: int = 0,
    sparsities=SPARSITIES,
) -> dict:
    import torch

    import tvm_sparse
    from tvm_sparse.benchmarking import (
        onnx_bytes,
        ort_runner,
        time_interleaved,
        torch_runner,
        tvm_runner,
    )

    torch.set_num_threads(THREADS)
    fc_layers, conv_layers = model_layers() if layers_from == "models" else (FC_LAYERS, CONV_LAYERS)
    layers = [("fc", s) for s in fc_layers] + [("conv", s) for s in conv_layers]
    if only:
        layers = [(k, s) for k, s in layers if any(o in s[0] for o in only.split(","))]
    results = []
    for kind, shape in layers:
        block = fc_block if kind == "fc" else conv_block
        dense_ms = None
        for sparsity in sparsities:
            t0 = time.perf_counter()
            model, x = _layer_model(kind, shape, sparsity, block, seed=len(results), bcr=bcr)
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            cm = tvm_sparse.compile(model, (x,))
            untuned = cm
            if tune_trials:  # MetaSchedule over the kernel's knobs; records in a fresh dir
                import tempfile

                work = tempfile.mkdtemp(prefix="bench-block-tune-")
                tvm_sparse.tune(model, (x,), trials=tune_trials, work_dir=work, progress=False)
                cm = tvm_sparse.compile(model, (x,), tuning=work)
            rec = next(r for r in cm.layers if r.op in ("matmul", "conv2d"))
            runners = {
                "tvm-sparse": tvm_runner(cm, (x,)),
                "PyTorch": torch_runner(model, (x,), THREADS),
                "ONNX Runtime": ort_runner(onnx_bytes(model, (x,)), (x,), THREADS),
            }
            if tune_trials:
                runners["untuned"] = tvm_runner(untuned, (x,))
            if dense_ms is None:  # TVM dense is the same for every sparsity: time it once
                dense = tvm_sparse.compile(model, (x,), sparse=False)
                runners["TVM dense"] = tvm_runner(dense, (x,))
            err = float(np.max(np.abs(cm(x) - ref)))
            scale = max(1.0, float(np.abs(ref).max()))
            assert err <= 1e-4 * scale * 10, f"{shape[0]}: max error {err}"
            ms = time_interleaved(runners, rounds=rounds)
            dense_ms = ms.get("TVM dense", dense_ms)
            ms["TVM dense"] = dense_ms
            best = min(ms["PyTorch"], ms["ONNX Runtime"])
            row = {
                "layer": shape[0], "kind": kind, "shape": rec.shape,
                "block": f"{block[0]}x{block[1]}", "sparsity": sparsity,
                "format": rec.format, "reason": rec.reason, "ms": ms,
                "speedup_vs_best_dense": best / ms["tvm-sparse"], "max_err": err,
            }  # fmt: skip
            results.append(row)
            _say(
                f"{shape[0]:<28} {sparsity:.0%} {rec.format:<7} "
                + " ".join(f"{k}={v:.3f}" for k, v in ms.items())
                + f"  x{row['speedup_vs_best_dense']:.2f}  ({time.perf_counter() - t0:.0f}s)"
            )
    return {"threads": THREADS, "rounds": rounds, "rows": results,
            "pruning": "bcr" if bcr else "bsr", "tune_trials": tune_trials}  # fmt: skip


def _markdown(payload: dict) -> str:
    from tvm_sparse.benchmarking import markdown_table

    header = [
        "layer",
        "shape",
        "block sparsity",
        "format (choice)",
        "tvm-sparse ms",
        "TVM dense ms",
        "PyTorch ms",
        "ORT ms",
        "vs best of PyTorch/ORT",
        "choice: why",
    ]
    rows = []
    for r in payload["rows"]:
        ms = r["ms"]
        tuned = f" (untuned {ms['untuned']:.3f})" if "untuned" in ms else ""
        rows.append([r["layer"], r["shape"], f"{r['sparsity']:.0%} ({r['block']})", r["format"],
                     f"{ms['tvm-sparse']:.3f}{tuned}",
                     f"{ms['TVM dense']:.3f}", f"{ms['PyTorch']:.3f}",
                     f"{ms['ONNX Runtime']:.3f}", f"{r['speedup_vs_best_dense']:.2f}x",
                     r["reason"]])  # fmt: skip
    summary = []
    for sparsity in SPARSITIES:
        ratios = sorted(r["speedup_vs_best_dense"] for r in payload["rows"]
                        if r["sparsity"] == sparsity)  # fmt: skip
        if ratios:
            summary.append(
                f"{sparsity:.0%}: {ratios[0]:.2f}x / {float(np.median(ratios)):.2f}x / "
                f"{ratios[-1]:.2f}x ({sum(x >= 4 for x in ratios)} of {len(ratios)} >= 4x)"
            )
    load = payload.get("loadavg_before_after")
    load_text = f" Load average (1, 5, 15 min) before / after: {load}." if load else ""
    return (
        f"Batch 1, {payload['threads']} threads, medians of {payload['rounds']} interleaved "
        "rounds; one-layer models (1x1 conv + bias + ReLU / linear + bias), weights pruned to "
        f"{payload.get('pruning', 'bsr').upper()} blocks"
        + (
            f", tvm-sparse tuned with {payload['tune_trials']} MetaSchedule trials per layer"
            if payload.get("tune_trials")
            else ""
        )
        + "; the format column is tvm-sparse's own "
        f"per-layer choice.{load_text}\n\nvs the faster of PyTorch / ONNX Runtime, min / median / "
        f"max by block sparsity: {'; '.join(summary)}.\n\n" + markdown_table(header, rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh-costs", action="store_true", help="re-measure the cost table")
    parser.add_argument("--fc-block", default="16x1", help="BSR block the FC weights are pruned to")
    parser.add_argument("--conv-block", default="8x1", help="BSR block of the 1x1 conv weights")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", help="the layers whose name contains one of these (a,b,...)")
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials per layer")
    parser.add_argument("--sparsities", default="0.5,0.8,0.9")
    parser.add_argument("--subset", action="store_true", help="the 13 hand-picked layers only")
    parser.add_argument("--bcr", action="store_true", help="prune to GRIM BCR blocks (8x8/16x16)")
    parser.add_argument("--render", action="store_true", help="rewrite OUT.md from OUT.json")
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "block_layers")
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    if args.refresh_costs:  # the same as `tvm-sparse costs`
        from tvm_sparse.cost_model import refresh_cost_table

        _say(f"wrote {refresh_cost_table()}")
        return 0
        return 0
    from tvm_sparse.benchmarking import write_results

    if args.render:
        with open(args.out + ".json") as f:
            payload = json.load(f)
        write_results(args.out, payload, _markdown(payload))
        return 0

    def block(text: str) -> tuple[int, int]:
        r, c = text.split("x")
        return int(r), int(c)

    load_before = os.getloadavg()
    fc_block, conv_block = block(args.fc_block), block(args.conv_block)
    if args.bcr and args.fc_block == "16x1":
        fc_block = conv_block = (16, 16)
    payload = run_layers(fc_block, conv_block, args.rounds, args.only,
                         "subset" if args.subset else "models", args.bcr, args.tune,
                         tuple(float(v) for v in args.sparsities.split(",")))  # fmt: skip
    payload["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    md = _markdown(payload)
    print(md)
    write_results(args.out, payload, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
