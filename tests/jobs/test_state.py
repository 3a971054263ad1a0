"""State beside the output: partials and unit moments round-trip exactly."""

from __future__ import annotations

import pickle

import numpy as np

from repscope.cluster.accumulate import block_moments
from repscope.cluster.moments import CrossMoments, UnitMoments
from repscope.jobs.state import StateStore, decode, digest, encode


def test_cross_moments_roundtrip_bit_exact():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 7))
    m = block_moments(z, widths_a=(3, 4), fourth=True)
    back = decode(encode(m), CrossMoments)
    assert back.n == m.n and back.widths_a == (3, 4) and back.diagonal == m.diagonal
    for name in ("mean_a", "mean_b", "c", "s", "p", "q", "ta", "tb"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))


def test_state_store_put_get_local_and_memory(tmp_path):
    unit = UnitMoments(n=5, mean=np.arange(3.0), cxx=np.eye(3), sum_a2=None)
    for output in (str(tmp_path / "r.zarr"), "memory://state-test/r.zarr"):
        state = StateStore(output)
        key = digest("unit", 1)
        assert state.get("units", key, UnitMoments) is None and not state.has("units", key)
        state.put("units", key, unit)
        state = pickle.loads(pickle.dumps(state))
        back = state.get("units", key, UnitMoments)
        assert back.n == 5 and back.sum_a2 is None
        np.testing.assert_array_equal(back.cxx, np.eye(3))
    assert not list((tmp_path / "r.zarr.state" / "units").glob("*partial*"))


def test_digest_is_stable_and_sensitive():
    assert digest("a", [1, 2], {"x": 1}) == digest("a", [1, 2], {"x": 1})
    assert digest("a", [1, 2]) != digest("a", [2, 1])
