"""In-place tile accumulation equals the exact block/merge path, whatever the blocks."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.moments import TileAccumulator, block_moments


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
    acc = TileAccumulator((40, 50), None, dtype)
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
    acc = TileAccumulator((60,), (20, 15), dtype)
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
