"""FoldBatchNorm: conv (+ bias) + batch_norm -> conv with a scaled weight + one bias add."""

import numpy as np
import tvm
from tvm import relax

from relay_passes.fold_batch_norm import FoldBatchNorm

EPS = 1e-5


def _stats(n, seed=0):
    rng = np.random.default_rng(seed)
    gamma, beta, mean = (rng.standard_normal(n).astype("float32") for _ in range(3))
    var = (rng.random(n) + 0.5).astype("float32")
    return gamma, beta, mean, var


def _before(weight, bias, stats):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=1))
            if bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
            norm = bb.emit(relax.op.nn.batch_norm(y, *map(relax.const, stats), axis=1, epsilon=EPS))
            out = bb.emit_output(relax.TupleGetItem(norm, 0))
        bb.emit_func_output(out)
    return bb.get()


def _expected(weight, bias, stats):
    gamma, beta, mean, var = (s.astype(np.float64) for s in stats)
    scale = gamma / np.sqrt(var + EPS)
    b = np.zeros_like(mean) if bias is None else bias.astype(np.float64)
    w = (weight * scale.reshape(-1, 1, 1, 1)).astype("float32")
    shift = ((b - mean) * scale + beta).astype("float32").reshape(1, -1, 1, 1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1))
            out = bb.emit_output(relax.op.add(y, relax.const(shift)))
        bb.emit_func_output(out)
    return bb.get()


def _weight():
    w = np.random.default_rng(1).standard_normal((3, 4, 3, 3)).astype("float32")
    w[:, :, 0, :] = 0.0  # pruned taps must stay exactly zero
    return w


def test_conv_with_bias_then_batch_norm():
    w, b, stats = _weight(), np.arange(3, dtype="float32"), _stats(3)
    after = relax.transform.DeadCodeElimination()(FoldBatchNorm(_before(w, b, stats)))
    tvm.ir.assert_structural_equal(after, _expected(w, b, stats))
    folded = after["main"].body.blocks[0].bindings[0].value.args[1].value.numpy()
    assert np.all(folded[:, :, 0, :] == 0.0)


def test_conv_without_bias_then_batch_norm():
    w, stats = _weight(), _stats(3, seed=2)
    after = relax.transform.DeadCodeElimination()(FoldBatchNorm(_before(w, None, stats)))
    tvm.ir.assert_structural_equal(after, _expected(w, None, stats))
