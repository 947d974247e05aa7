"""BSR format: exact round trip, balanced shares, detection and the cost-based choice."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvm_sparse.formats import BSRWeight, CostTable, block_sparsity, choose_block_format
from tvm_sparse.formats.block import BCR_SHAPES, BLOCK_SHAPES, BCRWeight, load_cost_table
from tvm_sparse.prune import project_bcr, project_bsr
from tvm_sparse.testing import random_bsr

BLOCKS = st.sampled_from(BLOCK_SHAPES + ((2, 3), (3, 1)))


@settings(max_examples=80, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    block=BLOCKS,
    keep=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    shares=st.integers(1, 4),
    conv=st.booleans(),
    seed=st.integers(0, 999),
)
def test_round_trip_is_exact(rows, cols, block, keep, shares, conv, seed):
    mat = random_bsr(rows, cols, block, keep, seed)
    weight = mat.reshape(rows, cols, 1, 1) if conv else mat
    packed = BSRWeight.from_dense(weight, block, num_shares=shares)
    np.testing.assert_array_equal(packed.to_dense(), mat)
    r, c = block
    assert packed.num_rows == -(-rows // r)
    assert sorted(packed.row_order.tolist()) == list(range(packed.num_rows))
    assert packed.block_ptr[-1] == packed.num_blocks == block_sparsity(mat, block).nonzero_blocks
    assert packed.block_values.shape == (packed.num_blocks, c, r)
    args = packed.kernel_args()  # never zero-length, even with no block at all
    assert all(a.size > 0 for a in args)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    block=st.sampled_from([(8, 8), (4, 4), (3, 5), (16, 16)]),
    row_keep=st.sampled_from([0.1, 0.5, 1.0]),
    col_keep=st.sampled_from([0.1, 0.5, 1.0]),
    zero_blocks=st.booleans(),
    seed=st.integers(0, 999),
)
def test_bcr_round_trip_is_exact(rows, cols, block, row_keep, col_keep, zero_blocks, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mat = project_bcr(w, block, row_keep, col_keep).numpy()
    if zero_blocks:  # some blocks entirely pruned: they are not stored
        mat = mat * random_bsr(rows, cols, block, 0.5, seed).astype(bool)
    packed = BCRWeight.from_dense(mat, block, num_shares=2)
    np.testing.assert_array_equal(packed.to_dense(), mat)
    n_r, n_c = packed.kept
    stats = block_sparsity(mat, block)
    assert packed.num_blocks == stats.nonzero_blocks
    if not zero_blocks and rows % block[0] == 0 and cols % block[1] == 0:
        assert (
            n_r * n_c * packed.num_blocks == int((mat != 0).sum()) or (mat == 0).any(axis=0).any()
        )
    assert all(a.size > 0 for a in packed.kernel_args())


def test_bcr_choice_for_a_row_column_pruned_weight():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    mat = project_bcr(w, (8, 8), 0.5, 0.5).numpy()
    costs = _table(fc_dense=(0, 1.0), fc_bsr_4x1=(0, 4.0), fc_bcr_8x8=(0, 1.0))
    choice = choose_block_format(mat, costs, "fc", work=1)
    assert (choice.format, choice.block) == ("bcr", (8, 8))
    assert "4x4 of each block" in choice.reason


def test_shares_are_balanced():
    """Block rows with very different counts: each contiguous half holds about half the work."""
    mat = np.zeros((64, 64), "float32")
    for i in range(16):  # 4x1 block row i keeps i + 1 blocks
        mat[4 * i : 4 * i + 4, : i + 1] = 1.0
    packed = BSRWeight.from_dense(mat, (4, 1), num_shares=2)
    counts = np.diff(packed.block_ptr)
    halves = counts[:8].sum(), counts[8:].sum()
    assert abs(int(halves[0]) - int(halves[1])) <= 1
    np.testing.assert_array_equal(packed.to_dense(), mat)


def test_detection_agrees_with_the_pruning_projections():
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    bsr = block_sparsity(project_bsr(w, (8, 1), 0.25).numpy(), (8, 1))
    assert bsr.block_density == 0.25 and bsr.density == 0.25 and bsr.fill == 1.0
    bcr = block_sparsity(project_bcr(w, (8, 8), 0.5, 0.5).numpy(), (8, 8))
    assert bcr.density == bcr.rowcol_density == 0.25 and bcr.block_density == 1.0


def _table(**entries) -> CostTable:
    return CostTable("test", {k: tuple(v) for k, v in entries.items()})


def test_choice_picks_the_cheapest_block_shape_and_says_why():
    mat = random_bsr(64, 64, (4, 1), 0.2, seed=1)  # 4x1-pruned: 8x1 blocks would hold zeros
    costs = _table(fc_dense=(0, 1.0), fc_bsr_8x1=(0, 6.0), fc_bsr_4x1=(0, 4.0))
    choice = choose_block_format(mat, costs, "fc", work=1)
    assert choice.format == "bsr" and choice.block == (4, 1)
    assert set(choice.estimates) == {"dense", "bsr 8x1", "bsr 4x1"}
    assert choice.estimates["bsr 4x1"] < choice.estimates["bsr 8x1"]
    assert "bsr 4x1" in choice.reason and "vs dense" in choice.reason


def test_choice_keeps_dense_when_dense_is_estimated_faster():
    mat = random_bsr(64, 64, (8, 1), 0.5, seed=2)
    costs = _table(conv_dense=(0.0, 1e-6), conv_bsr_8x1=(0.0, 1e-4))  # BSR: 12.5x per MAC
    choice = choose_block_format(mat, costs, "conv", work=49)
    assert choice.format == "dense" and choice.block is None
    assert choice.reason.startswith("dense by cost")


@settings(max_examples=40, deadline=None)
@given(
    keep=st.sampled_from([0.05, 0.3, 0.5, 0.65]),  # (above MOSTLY_DENSE nothing is scanned)
    block=st.sampled_from(((4, 1), (8, 8))),
    per_unit=st.tuples(*[st.sampled_from([0.5, 2.0, 8.0, 40.0])] * 3),
    seed=st.integers(0, 999),
)
def test_candidates_skipped_by_their_bound_never_change_the_choice(keep, block, per_unit, seed):
    """Candidates whose least work already loses to dense are not scanned: the choice equals
    the one from every candidate's exact estimate (the same table without a dense entry)."""
    mat = random_bsr(48, 64, block, keep, seed)
    mat[np.random.default_rng(seed).random(mat.shape) < 0.1] = 0  # unstructured zeros too
    blocks = dict(
        fc_bsr_8x1=(0, per_unit[0]), fc_bsr_4x4=(0, per_unit[1] * 4), fc_bcr_8x8=(0, per_unit[2])
    )
    got = choose_block_format(mat, _table(fc_dense=(0, 1.0), **blocks), "fc", work=1)
    exact = choose_block_format(mat, _table(**blocks), "fc", work=1)
    dense_ms = mat.size * 1.0
    best_ms = min(exact.estimates.values(), default=float("inf"))  # none: mostly dense
    want = ("dense", None) if dense_ms <= best_ms else (exact.format, exact.block)
    assert (got.format, got.block) == want
    if exact.estimates:
        assert got.reason.startswith("dense by cost") == (want[0] == "dense")
    else:  # the unstructured zeros left it mostly dense: nothing scanned, and it says so
        assert got.reason.endswith("nonzero: no block format"), got.reason


def test_no_table_means_no_block_format():
    choice = choose_block_format(np.zeros((8, 8), "float32"), _table(), "fc", work=1)
    assert choice.format == "dense" and "no cost table" in choice.reason


def test_shipped_table_has_every_kind():
    table = load_cost_table("")
    kinds = {"fc_dense", "conv_dense", "conv_pattern"}
    kinds |= {f"{op}_bsr_{r}x{c}" for op in ("fc", "conv") for r, c in BLOCK_SHAPES}
    kinds |= {f"{op}_bcr_{r}x{c}" for op in ("fc", "conv") for r, c in BCR_SHAPES}
    assert kinds <= set(table.entries)
    assert all(per_unit > 0 and overhead >= 0 for overhead, per_unit in table.entries.values())


def test_mostly_dense_weights_get_no_block_format():
    mat = np.ones((48, 64), "float32")
    mat[:, :8] = 0  # 87.5 % nonzero, whole 8x1 blocks zero: still the dense kernel's job
    costs = _table(fc_dense=(0, 1.0), fc_bsr_8x1=(0, 0.01))  # however cheap blocks look
    choice = choose_block_format(mat, costs, "fc", work=1)
    assert choice.format == "dense" and choice.reason == "88% nonzero: no block format"


def test_a_block_format_must_beat_the_fallback_by_the_margin():
    mat = np.zeros((32, 64), "float32")
    mat[:, :32] = 1.0  # half of the 8x1 blocks
    costs = _table(linear_dense=(0, 1.0), linear_bsr_8x1=(0, 8 * 1.8))  # 1.11x faster
    plain = choose_block_format(mat, costs, "linear", work=4)
    assert plain.format == "bsr"
    strict = choose_block_format(mat, costs, "linear", work=4, margin=1.25)
    assert strict.format == "dense" and "needs 1.25x" in strict.reason
