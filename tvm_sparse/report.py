"""The compile report: one record per layer the passes looked at."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LayerRecord:
    """One row of ``CompiledModel.report()``: what was chosen for a layer and why."""

    name: str
    op: str
    shape: str
    format: str  # "pattern", "dense" (tvm-sparse's dense kernel) or "tvm" (TVM's default path)
    density: float
    flops_dense: int
    flops_kept: int
    reason: str
    epilogue: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def format_report(layers: list[LayerRecord]) -> str:
    """A fixed-width table of the records and the total FLOPs kept."""
    width = max([len(r.name) for r in layers] + [5])
    lines = [
        f"{'layer':<{width}} {'weight / input':<28} {'format':<8} {'density':>7} "
        f"{'FLOPs kept':>10}  {'fused':<18} why",
    ]
    dense = kept = 0
    for rec in layers:
        frac = f"{rec.flops_kept / rec.flops_dense:.1%}" if rec.flops_dense else "-"
        dense += rec.flops_dense
        kept += rec.flops_kept
        lines.append(
            f"{rec.name:<{width}} {rec.shape:<28} {rec.format:<8} {rec.density:>7.1%} "
            f"{frac:>10}  {rec.epilogue or '-':<18} {rec.reason}"
        )
    if dense:
        lines.append(
            f"total: {kept / 1e6:.1f} of {dense / 1e6:.1f} MFLOP kept "
            f"({dense / max(kept, 1):.2f}x fewer)"
        )
    return "\n".join(lines)
