"""cluster.blas: the accumulation's BLAS products, equal to numpy's and run without the GIL."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from repscope.cluster.blas import gemm_tn, syrk_upper
from repscope.errors import InputError


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-4), (np.float64, 1e-12)])
def test_products_equal_numpy(dtype, tol):
    rng = np.random.default_rng(0)
    za = rng.standard_normal((301, 70)).astype(dtype)
    zb = rng.standard_normal((301, 45)).astype(dtype)
    c = np.full((70, 70), 7.0, dtype=dtype, order="F")
    syrk_upper(za, c)
    exact = za.astype(np.float64).T @ za
    upper = np.triu_indices(70)
    np.testing.assert_allclose(c[upper], exact[upper], rtol=0, atol=tol * np.abs(exact).max())
    assert np.all(c[np.tril_indices(70, -1)] == 7.0)  # the lower triangle is not written
    g = np.full((70, 45), np.nan, dtype=dtype, order="F")
    gemm_tn(za, zb, g)
    exact = za.astype(np.float64).T @ zb
    np.testing.assert_allclose(g, exact, rtol=0, atol=tol * np.abs(exact).max())


def test_zero_rows_give_zero_products():
    c = np.ones((3, 3), order="F")
    syrk_upper(np.empty((0, 3)), c)
    assert np.all(np.triu(c) == 0) and c[2, 0] == 1.0
    g = np.ones((3, 2), order="F")
    gemm_tn(np.empty((0, 3)), np.empty((0, 2)), g)
    assert np.all(g == 0)


def test_layouts_and_dtypes_are_checked():
    z = np.ones((5, 3))
    with pytest.raises(InputError, match="Fortran-ordered"):
        syrk_upper(z, np.zeros((3, 3)))  # C order
    with pytest.raises(InputError, match="C-contiguous"):
        syrk_upper(np.asfortranarray(z), np.zeros((3, 3), order="F"))
    with pytest.raises(InputError, match="float32 or float64"):
        syrk_upper(z.astype(np.float32), np.zeros((3, 3), order="F"))
    with pytest.raises(InputError, match="rows"):
        gemm_tn(z, np.ones((4, 2)), np.zeros((3, 2), order="F"))
    with pytest.raises(InputError, match=r"\(3, 2\)"):
        gemm_tn(z, np.ones((5, 2)), np.zeros((3, 3), order="F"))


def test_other_threads_run_during_a_product():
    """The point of the module: a Python thread (the block reader) keeps running."""
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    z = np.random.default_rng(0).standard_normal((4000, 2000))
    c = np.zeros((2000, 2000), order="F")
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        time.sleep(0.2)
        before, t0 = count[0], time.perf_counter()
        time.sleep(0.2)
        rate = (count[0] - before) / (time.perf_counter() - t0)  # spins per second, free
        with threadpool_limits(limits=1, user_api="blas"):
            seconds = 0.0
            while seconds < 0.3:  # enough calls to dwarf one GIL switch interval (5 ms)
                before, t0 = count[0], time.perf_counter()
                syrk_upper(z, c)
                gemm_tn(z, z, c)
                seconds = time.perf_counter() - t0
                spins = count[0] - before
                z = np.concatenate([z, z])
    finally:
        stop.set()
        thread.join()
    # Holding the GIL, the spinner would get at most a switch interval per call.
    assert spins > 0.2 * rate * seconds


def test_a_task_limit_holds_for_the_products_in_a_new_process():
    """threadpoolctl limits only the BLAS libraries already loaded: blas_threads loads
    scipy's (the products' library) before it limits, so a new process's first task obeys."""
    import subprocess
    import sys

    code = (
        "from repscope.cluster.tasks import blas_threads\n"
        "from threadpoolctl import threadpool_info\n"
        "with blas_threads(1):\n"
        "    from repscope.cluster.blas import syrk_upper\n"
        "    import numpy as np\n"
        "    z = np.ones((64, 8), np.float32); c = np.zeros((8, 8), np.float32, order='F')\n"
        "    syrk_upper(z, c)\n"
        "    print(sorted({i['num_threads'] for i in threadpool_info()\n"
        "                  if i['user_api'] == 'blas'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "2"})
    assert out.stdout.strip() == "[1]"
