"""In-place tile accumulation equals the exact block/merge path, whatever the blocks."""

from __future__ import annotations

import numpy as np
import pytest

from repscope.cluster.accumulate import TileAccumulator, block_moments, shift_block
from repscope.errors import InputError


def _data(rows: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, width)) * 3 + rng.standard_normal(width) * 50
    z[rows // 2 :] += 4.0  # a mean that drifts between blocks
    return z.astype(np.float32)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
@pytest.mark.parametrize("block", [1, 333, 5000])
def test_diagonal_tile_matches_one_shot(dtype, tol, block):
    z = _data(2000, 90)
    ref = block_moments(z.astype(np.float64), widths_a=(40, 50))
    acc = TileAccumulator((40, 50), None, gemm_dtype=dtype)
    for i in range(0, len(z), block):
        acc.update(z[i : i + block])
    got = acc.result()
    assert got.n == ref.n and got.diagonal
    np.testing.assert_allclose(got.mean_a, ref.mean_a, rtol=1e-12, atol=1e-9)
    assert np.abs(got.c - ref.c).max() <= tol * np.abs(ref.c).max()
    np.testing.assert_array_equal(got.c, got.c.T)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-6), (np.float64, 1e-12)])
def test_cross_tile_matches_one_shot(dtype, tol):
    za, zb = _data(1500, 60, 1), _data(1500, 35, 2) * 2 + 1
    ref = block_moments(za.astype(np.float64), zb.astype(np.float64), widths_a=(60,),
                        widths_b=(20, 15))
    acc = TileAccumulator((60,), (20, 15), gemm_dtype=dtype)
    for i in range(0, 1500, 400):
        acc.update(za[i : i + 400].copy(), zb[i : i + 400].copy(), overwrite=True)
    got = acc.result()
    np.testing.assert_allclose(got.mean_b, ref.mean_b, rtol=1e-12, atol=1e-9)
    assert np.abs(got.c - ref.c).max() <= tol * np.abs(ref.c).max()


def test_input_is_left_alone_without_overwrite():
    z = _data(100, 8)
    before = z.copy()
    acc = TileAccumulator((8,))
    acc.update(z)
    np.testing.assert_array_equal(z, before)


def test_blocks_shifted_elsewhere_give_the_same_moments():
    """The reader thread shifts blocks (shift_block) before update: same result, bit for bit."""
    za, zb = _data(900, 30, 3), _data(900, 12, 4)
    raw, pre = TileAccumulator((30,), (12,)), TileAccumulator((30,), (12,))
    for i in range(0, 900, 250):
        raw.update(za[i: i + 250], zb[i: i + 250])
        pre.update(shift_block(za[i: i + 250].copy(), np.float32, "a", overwrite=True),
                   shift_block(zb[i: i + 250].copy(), np.float32, "b", overwrite=True))
    np.testing.assert_array_equal(raw.result().c, pre.result().c)
    acc = TileAccumulator((30,), (12,))
    with pytest.raises(InputError, match=r"group b block has shape \(250, 12\) \(float64\)"):
        acc.update(shift_block(za[:250], np.float32), shift_block(zb[:250], np.float64, "b"))
    bad = za[:10].copy()
    bad[3, 7] = np.nan
    with pytest.raises(InputError, match=r"group a has NaN or Inf values in columns \[7\]"):
        shift_block(bad, np.float32)


def _direct_fourth(za, zb, wa, wb):
    """Every moment straight from its definition, in float64 (rows on the global means)."""
    za, zb = za.astype(np.float64), zb.astype(np.float64)
    ac, bc = za - za.mean(0), zb - zb.mean(0)
    a = np.stack([(u**2).sum(1) for u in np.split(ac, np.cumsum(wa)[:-1], axis=1)], axis=1)
    b = np.stack([(v**2).sum(1) for v in np.split(bc, np.cumsum(wb)[:-1], axis=1)], axis=1)
    return dict(c=ac.T @ bc, s=a.T @ b, p=ac.T @ b, q=bc.T @ a, ta=a.sum(0), tb=b.sum(0))


@pytest.mark.parametrize("diagonal", [True, False])
# Measured: float64 3e-14 (p, q: centered sums, small next to the raw ones), float32 1.4e-6.
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 5e-6)])
def test_fourth_order_terms_stream_like_one_shot(diagonal, dtype, tol):
    """Fourth-order sums over blocks with drifting means (centered once, at the end)."""
    za, zb = _data(1200, 9, 5), _data(1200, 7, 6) * 0.5 - 3
    wa, wb = (2, 3, 4), (4, 3)
    acc = TileAccumulator(wa, None if diagonal else wb, fourth=True, gemm_dtype=dtype)
    for i in range(0, 1200, 250):
        acc.update(za[i: i + 250], None if diagonal else zb[i: i + 250])
    got = acc.result()
    want = _direct_fourth(za, za if diagonal else zb, wa, wa if diagonal else wb)
    for field, value in want.items():
        error = np.abs(getattr(got, field) - value).max() / np.abs(value).max()
        assert error <= tol, (field, error)


def test_wide_tiles_beyond_the_blocked_steps():
    """Above 1,024 columns the accumulator adds and mirrors by column steps: the diagonal
    tile's lower triangle and the cross tile must still equal the direct products."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((300, 1400)) + rng.standard_normal(1400) * 5
    widths = (1100, 300)
    acc = TileAccumulator(widths, gemm_dtype=np.float64)
    for i in range(0, 300, 128):
        acc.update(z[i: i + 128])
    got = acc.result()
    zc = z - z.mean(0)
    want = zc.T @ zc
    assert np.abs(got.c - want).max() <= 1e-11 * np.abs(want).max()
    np.testing.assert_array_equal(got.c, got.c.T)
    cross = TileAccumulator((1100,), (300, 1100), gemm_dtype=np.float64)
    zb = np.hstack([z[:, 1100:], z[:, :1100] * 2])
    for i in range(0, 300, 100):
        cross.update(z[i: i + 100, :1100], zb[i: i + 100])
    want = zc[:, :1100].T @ (zb - zb.mean(0))
    assert np.abs(cross.result().c - want).max() <= 1e-11 * np.abs(want).max()


def _extreme(rows: int, width: int, seed: int) -> np.ndarray:
    """Normal float32 columns, one with a value of 1e30, one of magnitude 1e-25, one of
    3e38 (the float32 maximum is 3.4e38)."""
    z = _data(rows, width, seed)
    z[rows // 3, 1] = 1e30
    z[:, 2] = z[:, 2] * np.float32(1e-25)
    z[rows // 2, 4] = 3e38
    return z


def test_columns_with_extreme_values_are_scaled_only_when_needed():
    z = _extreme(400, 9, 8)
    shifted = shift_block(z, np.float32)
    assert shifted.scale is not None
    assert set(np.flatnonzero(shifted.scale != 1.0)) == {1, 2, 4}
    assert np.all(np.abs(shifted.z[:, [1, 2, 4]]) <= 1.0)
    assert shift_block(_data(400, 9, 8), np.float32).scale is None


@pytest.mark.parametrize("diagonal", [True, False])
def test_extreme_values_stream_like_float64(diagonal):
    """Overflowing and underflowing columns, float32 products: every moment (fourth-order
    ones too) equals the float64 definition to float32 precision (measured 1.3e-6), entry
    by entry relative to its scale, and is finite (it was inf/NaN)."""
    za, zb = _extreme(900, 9, 9), _extreme(900, 7, 10) * np.float32(0.5)
    wa, wb = (4, 5), (3, 4)
    acc = TileAccumulator(wa, None if diagonal else wb, fourth=True, gemm_dtype=np.float32)
    for i in range(0, 900, 250):
        acc.update(za[i: i + 250], None if diagonal else zb[i: i + 250])
    got = acc.result()
    want = _direct_fourth(za, za if diagonal else zb, wa, wa if diagonal else wb)
    for field, value in want.items():
        have = getattr(got, field)
        assert np.all(np.isfinite(have)), field
        if field == "c":  # entry (i, j) relative to sqrt(C_ii C_jj)
            da = np.sqrt(np.diag(want["c"] if diagonal else _direct_fourth(
                za, za, wa, wa)["c"]))
            db = np.sqrt(np.diag(_direct_fourth(zb, zb, wb, wb)["c"])) if not diagonal else da
            assert np.abs((have - value) / np.outer(da, db)).max() <= 5e-6
        else:
            assert np.abs(have - value).max() <= 1e-5 * np.abs(value).max(), field


def test_sums_beyond_float64_are_refused_naming_the_row():
    z = np.ones((20, 3))
    z[11, 1] = 1e308
    z[12, 1] = 1e308
    with pytest.raises(InputError, match=r"too large to sum in float64 in columns \[1\] .*"
                                         r"row 11"):
        shift_block(z, np.float64)
    z[11, 1] = np.inf
    with pytest.raises(InputError, match=r"NaN or Inf values in columns \[1\].*row 11"):
        shift_block(z, np.float64)


def test_a_task_starts_with_a_small_block_then_full_ones():
    """The first block's read overlaps nothing, so it is small; the blocks tile the rows."""
    from repscope.cluster.tasks import FIRST_BLOCK_ROWS, TileTask, _blocks

    for start, stop, block in [(0, 30_000, 16_384), (100, 1_100, 16_384), (5, 9_000, 1_000),
                               (0, 0, 4_096), (0, FIRST_BLOCK_ROWS, 8_192)]:
        task = TileTask((), (4,), None, None, start, stop, block, False, "float32")
        blocks = list(_blocks(task))
        assert [b[0] for b in blocks[1:]] == [b[1] for b in blocks[:-1]]  # contiguous
        if stop > start:
            assert blocks[0][0] == start and blocks[-1][1] == stop
            assert blocks[0][1] - blocks[0][0] == min(block, FIRST_BLOCK_ROWS, stop - start)
            assert all(b - a == block for a, b in blocks[1:-1])
        else:
            assert blocks == []


def test_a_group_is_read_side_by_side_into_reused_memory(tmp_path):
    """A group of units of different widths and storage dtypes reads as their concatenation;
    a slot's next block lands in the same memory, and the units pass through one scratch
    array per dtype (memory touched for the first time is what a task pays for)."""
    from repscope.cluster.tasks import Buffers, UnitRef, read_group
    from repscope.store import ActivationStore, ingest_array

    store = ActivationStore.create(str(tmp_path / "acts.zarr"))
    widths = {"a": (7, "float32"), "b": (5, "float16"), "c": (9, "float32")}
    data = {}
    for k, (layer, (width, dtype)) in enumerate(widths.items()):
        data[layer] = _data(300, width, seed=k)
        ingest_array(store, "m", layer, data[layer], dtype=dtype)
    units = tuple(UnitRef("m", layer) for layer in widths)
    buffers = Buffers()
    first = read_group(store, units, 0, 100, out=buffers.slot(0))
    first_rows = first.copy()
    again = read_group(store, units, 100, 200, out=buffers.slot(0))
    expected = np.concatenate([store.read("m", layer, 100, 200) for layer in widths], axis=1)
    assert again.dtype == np.float32 and np.array_equal(again, expected)
    assert np.array_equal(expected[:, 7:12], data["b"][100:200].astype(np.float16))
    assert again.ctypes.data == first.ctypes.data  # the slot's memory, reused
    scratch = [key for key in buffers.arrays if key[0] == "scratch"]
    assert sorted(scratch) == [("scratch", "<f2"), ("scratch", "<f4")]
    assert np.array_equal(read_group(store, units, 0, 100), first_rows)  # without a slot
