"""The two BLAS products of the accumulation, called so that other Python threads keep running.

scipy.linalg.blas's wrappers hold the GIL for the whole call, so the thread that prefetches
the next row block could not run during a product: on W2 a block read that takes 0.6 s alone
took 11.8 s next to a 10.4 s ssyrk, and the job then waited for it. scipy also exports the
same BLAS (its bundled OpenBLAS) as C function pointers for Cython, in
``scipy.linalg.cython_blas.__pyx_capi__``; called through ctypes, which releases the GIL
around foreign calls, the product runs while the reader reads. Thread counts are still set
with threadpoolctl, as for scipy's wrappers.

Arrays follow the Fortran conventions of the accumulator: a row block ``z`` of shape
(rows, d), C-contiguous, is the column-major d x rows matrix Z^T; outputs are
Fortran-contiguous.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

from repscope.errors import InputError

_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}
_SCALAR = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}
_P = ctypes.c_void_p


@cache
def _function(name: str, n_args: int):
    from scipy.linalg import cython_blas

    capsule = cython_blas.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = _P, [ctypes.py_object, ctypes.c_char_p]
    address = get_pointer(capsule, get_name(capsule))
    # Fortran BLAS: every argument by reference, no return value.
    return ctypes.CFUNCTYPE(None, *([_P] * n_args))(address)


def _check(z: np.ndarray, c: np.ndarray, rows_of_c: int, cols_of_c: int) -> tuple:
    dtype = c.dtype
    if dtype not in _PREFIX or z.dtype != dtype:
        raise InputError(f"BLAS operands must share float32 or float64, got {z.dtype}, {dtype}")
    if z.ndim != 2 or not z.flags.c_contiguous:
        raise InputError(f"row block must be a C-contiguous 2-D array, got shape {z.shape}")
    if c.shape != (rows_of_c, cols_of_c) or not c.flags.f_contiguous or not c.flags.writeable:
        raise InputError(f"output must be a writeable Fortran-ordered ({rows_of_c}, "
                         f"{cols_of_c}) array, got shape {c.shape}")
    return _PREFIX[dtype], _SCALAR[dtype]


def _ref(value, kind):
    return ctypes.byref(kind(value))


def syrk_upper(z: np.ndarray, c: np.ndarray) -> None:
    """c = z^T z in the upper triangle of c (d x d); the lower triangle is left as it was.

    z: (rows, d), C-contiguous; c: (d, d), Fortran-contiguous, same dtype.
    """
    rows, d = z.shape
    prefix, real = _check(z, c, d, d)
    if rows == 0:
        c[np.triu_indices(d)] = 0.0
        return
    n, k = ctypes.c_int(d), ctypes.c_int(rows)
    _function(f"{prefix}syrk", 10)(
        ctypes.c_char_p(b"U"), ctypes.c_char_p(b"N"), ctypes.byref(n), ctypes.byref(k),
        _ref(1.0, real), z.ctypes.data, ctypes.byref(n), _ref(0.0, real), c.ctypes.data,
        ctypes.byref(n),
    )


def gemm_tn(za: np.ndarray, zb: np.ndarray, c: np.ndarray) -> None:
    """c = za^T zb.

    za: (rows, d_a), zb: (rows, d_b), both C-contiguous; c: (d_a, d_b), Fortran-contiguous.
    """
    if za.ndim != 2 or zb.ndim != 2:
        raise InputError(f"row blocks must be 2-D, got shapes {za.shape} and {zb.shape}")
    (rows, da), db = za.shape, zb.shape[1]
    prefix, real = _check(za, c, da, db)
    _check(zb, c, da, db)
    if zb.shape[0] != rows:
        raise InputError(f"row blocks have {rows} and {zb.shape[0]} rows")
    if rows == 0:
        c[...] = 0.0
        return
    m, n, k = ctypes.c_int(da), ctypes.c_int(db), ctypes.c_int(rows)
    _function(f"{prefix}gemm", 13)(
        ctypes.c_char_p(b"N"), ctypes.c_char_p(b"T"), ctypes.byref(m), ctypes.byref(n),
        ctypes.byref(k), _ref(1.0, real), za.ctypes.data, ctypes.byref(m), zb.ctypes.data,
        ctypes.byref(n), _ref(0.0, real), c.ctypes.data, ctypes.byref(m),
    )
