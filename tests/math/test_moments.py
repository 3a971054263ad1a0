"""Streaming statistics: block moments against direct sums, exact associative merges."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repscope.cluster.accumulate import block_moments
from repscope.cluster.moments import (
    CrossMoments,
    empty_moments,
    merge,
    merge_all,
    pair_moments,
    unit_moments,
)
from repscope.errors import InputError

FIELDS = ("mean_a", "mean_b", "c", "s", "p", "q", "ta", "tb")


def direct(za, zb, wa, wb):
    """The fourth-order sums straight from their definitions (rows centered on global means)."""
    ac, bc = za - za.mean(0), zb - zb.mean(0)
    cut_a, cut_b = np.cumsum(wa)[:-1], np.cumsum(wb)[:-1]
    a = np.stack([(u**2).sum(1) for u in np.split(ac, cut_a, axis=1)], axis=1)
    b = np.stack([(v**2).sum(1) for v in np.split(bc, cut_b, axis=1)], axis=1)
    return dict(c=ac.T @ bc, s=a.T @ b, p=ac.T @ b, q=bc.T @ a, ta=a.sum(0), tb=b.sum(0))


def assert_same(got: CrossMoments, want: CrossMoments, rtol: float) -> None:
    assert got.n == want.n
    for field in FIELDS:
        g, w = getattr(got, field), getattr(want, field)
        scale = max(1.0, float(np.max(np.abs(w))))
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=field)


def test_block_moments_equal_direct_sums():
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(40, 5)) + 3.0, rng.normal(size=(40, 4)) - 2.0
    m = block_moments(za, zb, widths_a=(2, 3), widths_b=(1, 3), fourth=True)
    for field, value in direct(za, zb, (2, 3), (1, 3)).items():
        np.testing.assert_allclose(getattr(m, field), value, rtol=1e-12, atol=1e-12)
    diag = block_moments(np.hstack([za, zb]), widths_a=(2, 3, 1, 3), fourth=True)
    assert diag.diagonal and np.array_equal(diag.c, diag.c.T)
    # the off-diagonal tile is a block of the diagonal tile of the concatenated group
    np.testing.assert_allclose(diag.c[:5, 5:], m.c, atol=1e-12)
    np.testing.assert_allclose(diag.s[:2, 2:], m.s, atol=1e-12)
    assert unit_moments(diag, 2).cxx.shape == (1, 1)
    assert pair_moments(diag, 0, 3).sum_ab == pytest.approx(m.s[0, 1])
    assert pair_moments(m, 1, 0).swapped().cxy.shape == (1, 3)


def random_merge(parts: list[CrossMoments], rnd: random.Random) -> CrossMoments:
    """Merge in a random tree: pick any two partials, merge in random order, repeat."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = rnd.sample(range(len(parts)), 2)
        merged = merge(parts[i], parts[j])
        parts = [p for k, p in enumerate(parts) if k not in (i, j)] + [merged]
    return parts[0]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(4, 60),
    n_cuts=st.integers(0, 8),
    diagonal=st.booleans(),
    offset=st.sampled_from([0.0, 5.0, 1e3]),
)
def test_random_splits_and_merge_orders_equal_one_shot(seed, n, n_cuts, diagonal, offset):
    """Any split of the rows (empty blocks included), merged in any order: 1e-10 relative."""
    rng = np.random.default_rng(seed)
    rnd = random.Random(seed)
    wa, wb = (2, 1, 3), (3, 2)
    za = rng.normal(size=(n, sum(wa))) + offset * rng.normal(size=sum(wa))
    zb = rng.normal(size=(n, sum(wb))) + offset * rng.normal(size=sum(wb))
    cuts = [0, *sorted(rng.integers(0, n + 1, size=n_cuts).tolist()), n]
    if diagonal:
        def moments(i, j):
            return block_moments(za[i:j], widths_a=wa, fourth=True)
    else:
        def moments(i, j):
            return block_moments(za[i:j], zb[i:j], widths_a=wa, widths_b=wb, fourth=True)
    parts = [moments(i, j) for i, j in zip(cuts[:-1], cuts[1:], strict=True)]
    one_shot = moments(0, n)
    assert_same(random_merge(parts, rnd), one_shot, rtol=1e-10)
    assert_same(merge_all(parts), one_shot, rtol=1e-10)


def test_merge_is_associative_and_has_identity():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(30, 4)) * 10 + 100
    a, b, c = (block_moments(z[i:j], widths_a=(1, 3), fourth=True)
               for i, j in [(0, 5), (5, 17), (17, 30)])
    assert_same(merge(merge(a, b), c), merge(a, merge(b, c)), rtol=1e-12)
    empty = empty_moments((1, 3), fourth=True)
    assert merge(empty, a) is a and merge(a, empty) is a
    assert_same(block_moments(z[:0], widths_a=(1, 3), fourth=True), empty, rtol=0)


def test_float32_gemm_centered_on_float64_mean():
    """Means ~1e4: the float32 product of centered rows keeps C to ~1e-6 relative."""
    rng = np.random.default_rng(4)
    z = (1e4 + rng.normal(size=(2000, 6))).astype(np.float32)
    m32 = block_moments(z, widths_a=(6,), gemm_dtype=np.float32)
    m64 = block_moments(z.astype(np.float64), widths_a=(6,))
    assert m32.c.dtype == np.float64
    np.testing.assert_allclose(m32.c, m64.c, rtol=0, atol=1e-6 * np.abs(m64.c).max())


def test_merge_refuses_different_tiles():
    z = np.ones((3, 3)) + np.eye(3)
    with pytest.raises(InputError, match="different tiles"):
        merge(block_moments(z, widths_a=(3,)), block_moments(z, widths_a=(1, 2)))
    with pytest.raises(InputError, match="different tiles"):
        merge(block_moments(z, widths_a=(3,)), block_moments(z, widths_a=(3,), fourth=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(za=np.zeros(3), widths_a=(3,)), "2-D"),
        (dict(za=np.zeros((3, 3)), widths_a=(2,)), "widths_a"),
        (dict(za=np.zeros((3, 3)), zb=np.zeros((4, 2)), widths_a=(3,), widths_b=(2,)), "rows"),
        (dict(za=np.array([[1.0, np.nan]]), widths_a=(2,)), "NaN or Inf"),
        (dict(za=np.zeros((3, 3)), widths_a=(3,), gemm_dtype=np.float16), "gemm_dtype"),
    ],
)
def test_block_moments_refuses_bad_input(kwargs, match):
    with pytest.raises(InputError, match=match):
        block_moments(**kwargs)


def test_unit_moments_need_a_diagonal_tile():
    z = np.arange(12.0).reshape(4, 3) ** 2
    off = block_moments(z, z, widths_a=(3,), widths_b=(3,))
    with pytest.raises(InputError, match="diagonal tile"):
        unit_moments(off, 0)
    with pytest.raises(InputError, match="out of range"):
        pair_moments(off, 0, 1)


def test_merge_all_leaves_its_parts_as_they_were():
    """Merges above the first level reuse the first level's arrays, never a caller's part
    (a part may be a read-only array in Ray's object store)."""
    rng = np.random.default_rng(11)
    blocks = [rng.standard_normal((n, 6)) + k for k, n in enumerate((5, 7, 1, 9, 4))]
    parts = [block_moments(b, widths_a=(2, 4)) for b in blocks]
    for p in parts:
        p.c.flags.writeable = False
    before = [p.c.copy() for p in parts]
    merged = merge_all(parts)
    for p, b in zip(parts, before, strict=True):
        np.testing.assert_array_equal(p.c, b)
    whole = block_moments(np.vstack(blocks), widths_a=(2, 4))
    assert merged.n == whole.n == 26
    np.testing.assert_allclose(merged.c, whole.c, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(merge_all(parts).c, merged.c)
