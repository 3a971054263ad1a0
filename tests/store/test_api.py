"""The Python API: open_store(url, mode) and store.writer(model, layer) as a context manager."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest

import repscope.store
from repscope.errors import InputError, NotFoundError
from repscope.store import UnclosedWriterWarning, open_store


def test_open_store_modes(tmp_path):
    url = str(tmp_path / "acts.zarr")
    with pytest.raises(NotFoundError, match=r"^no store at .*acts.zarr; create one"):
        open_store(url)
    created = open_store(url, mode="a")
    assert created.units() == [] and created.format == 2
    assert open_store(url, "r").url == url
    with pytest.raises(InputError, match=r"^mode 'w' is not a store mode: use 'r' \(must exist\) "
                                         r"or 'a' \(create if missing\)$"):
        open_store(url, mode="w")
    assert "open_store" in repscope.store.__all__


def test_writer_publishes_at_the_end_of_the_block(memory):
    store = open_store(memory.url(), mode="a")
    batches = [np.full((7, 3), i, np.float32) for i in range(4)]
    with store.writer("m", "l") as w:
        for b in batches:
            w.append(b)
            assert store.units() == []  # invisible until the block exits
    assert store.units() == [("m", "l")]
    info = store.unit_info("m", "l")
    assert (info.rows, info.features, info.version) == (28, 3, info.version)
    np.testing.assert_array_equal(store.read("m", "l"), np.concatenate(batches))

    with pytest.raises(KeyError):
        with store.writer("m", "l", overwrite=True) as w:
            w.append(np.zeros((5, 3)))
            raise KeyError("the training loop failed")
    np.testing.assert_array_equal(store.read("m", "l"), np.concatenate(batches))  # unchanged
    assert store.unit_info("m", "l").version == info.version


def test_a_dropped_writer_warns_naming_model_and_layer(memory):
    store = open_store(memory.url(), mode="a")
    w = store.writer("resnet", "fc")
    w.append(np.ones((3, 2)))
    with pytest.warns(UnclosedWriterWarning, match=r"model 'resnet', layer 'fc' was "
                                                   r"garbage-collected without close\(\)"):
        del w
        gc.collect()
    assert store.units() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed, aborted or refused writers stay silent
        with store.writer("resnet", "fc") as w:
            w.append(np.ones((3, 2)))
        w2 = store.writer("resnet", "fc2")
        w2.abort()
        with pytest.raises(InputError):
            store.writer("resnet", "fc")  # exists
        del w, w2
        gc.collect()
