"""repscope.store.capture on plain torch modules: forward hooks, token rows, pooling, errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from repscope.errors import InputError
from repscope.store import ActivationStore
from repscope.store.capture import capture


@pytest.fixture
def store(tmp_path):
    return ActivationStore.create(str(tmp_path / "acts.zarr"))


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5), torch.nn.Tanh()
    )


class TokenModel(torch.nn.Module):
    """(batch, tokens) ids -> (batch, tokens, features) through an embedding and a layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = torch.nn.Embedding(30, 8)
        self.block = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        return self.block(h) * attention_mask[..., None]


def token_batches(widths=(5, 3, 6), batch=3, seed=2):
    """Batches of ids with attention masks of different widths, some rows padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for width in widths:
        ids = torch.randint(0, 30, (batch, width), generator=g)
        lengths = torch.randint(1, width + 1, (batch,), generator=g)
        lengths[0] = width  # every batch holds an example as long as the batch
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_mlp_units_equal_the_module_outputs(store):
    model = mlp()
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
    infos = capture(model, [x[:17], x[17:40], x[40:]], store, "mlp",
                    layers={"hidden": "1", "out": "3"})
    assert [(i.layer, i.rows, i.features) for i in infos] == [("hidden", 50, 12), ("out", 50, 5)]
    with torch.no_grad():
        hidden = model[1](model[0](x))
        out = model(x)
    np.testing.assert_array_equal(store.read("mlp", "hidden"), hidden.numpy())
    np.testing.assert_array_equal(store.read("mlp", "out"), out.numpy())
    assert model.training  # eval while capturing, then the mode it had


def test_cnn_outputs_are_flattened_or_averaged_over_positions(tmp_path):
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 3),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2),
    )
    images = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        conv1 = model[1](model[0](images))
        conv2 = model[2](conv1)
    flat = ActivationStore.create(str(tmp_path / "flat.zarr"))
    capture(model, images.split(4), flat, "cnn", layers=["1", "2", "4"])
    np.testing.assert_array_equal(flat.read("cnn", "1"), conv1.reshape(10, -1).numpy())
    np.testing.assert_array_equal(flat.read("cnn", "2"), conv2.reshape(10, -1).numpy())
    assert flat.unit_info("cnn", "4").features == 2
    mean = ActivationStore.create(str(tmp_path / "mean.zarr"))
    capture(model, images.split(4), mean, "cnn", layers=["2"], pool="mean")
    expected = conv2.double().mean(dim=(2, 3)).float().numpy()
    np.testing.assert_allclose(mean.read("cnn", "2"), expected, rtol=1e-6, atol=1e-7)


def test_token_outputs_become_the_rows_the_mask_keeps(store):
    model = TokenModel()
    batches = token_batches()
    ids = [f"ex{i}" for i in range(9)]
    infos = capture(model, batches, store, "tok", layers=["embed", "block"], example_ids=ids)
    expected_rows, example, width = [], [], max(b["input_ids"].shape[1] for b in batches)
    mask = np.ones((9, width), bool)
    with torch.no_grad():
        for b_index, b in enumerate(batches):
            keep = b["attention_mask"].numpy().astype(bool)
            expected_rows.append(model.embed(b["input_ids"]).numpy()[keep])
            for e in range(keep.shape[0]):
                example += [3 * b_index + e] * int(keep[e].sum())
                mask[3 * b_index + e, : keep.shape[1]] = ~keep[e]
    np.testing.assert_array_equal(store.read("tok", "embed"), np.concatenate(expected_rows))
    assert infos[0].rows == infos[1].rows == len(example)
    np.testing.assert_array_equal(store.example_index(), example)
    np.testing.assert_array_equal(store.padding_mask(), mask)
    assert list(store.row_ids()) == ids


def test_rows_do_not_depend_on_how_batches_are_padded(tmp_path):
    """Extra trailing padding in a batch changes nothing: not the rows, not the fingerprint."""
    batches = token_batches()
    padded = [dict(b) for b in batches]
    padded[1] = {key: torch.nn.functional.pad(value, (0, 4)) for key, value in batches[1].items()}
    a = ActivationStore.create(str(tmp_path / "a.zarr"))
    b = ActivationStore.create(str(tmp_path / "b.zarr"))
    capture(TokenModel(), batches, a, "tok", layers=["embed"])
    capture(TokenModel(), padded, b, "tok", layers=["embed"])
    assert a.row_fingerprint == b.row_fingerprint
    np.testing.assert_array_equal(a.read("tok", "embed"), b.read("tok", "embed"))


@pytest.mark.parametrize("pool", ["mean", "first", "last"])
def test_pooled_rows_one_per_example(store, pool):
    model = TokenModel()
    batches = token_batches()
    capture(model, batches, store, "tok", layers=["block"], pool=pool)
    expected = []
    with torch.no_grad():
        for b in batches:
            out = model(**b).numpy().astype(np.float64)
            keep = b["attention_mask"].numpy().astype(bool)
            for e in range(out.shape[0]):
                kept = out[e][keep[e]]
                expected.append({"mean": kept.mean(axis=0), "first": kept[0],
                                 "last": kept[-1]}[pool])
    got = store.read("tok", "block")
    assert got.shape == (9, 8) and store.example_index() is None
    np.testing.assert_allclose(got, np.array(expected, np.float32), rtol=1e-6, atol=1e-7)


def test_rows_stream_into_the_store_while_the_model_runs(tmp_path):
    """Shards are written as batches come, not held until the end (memory stays bounded)."""
    store = ActivationStore.create(str(tmp_path / "acts.zarr"))
    unit_dir = tmp_path / "acts.zarr" / "units" / "mlp" / "out"
    seen_during = []

    def batches():
        g = torch.Generator().manual_seed(6)
        for _ in range(20):
            seen_during.append(sum(f.stat().st_size for f in unit_dir.rglob("*")
                                   if f.is_file() and f.name != "zarr.json"))
            yield torch.randn(64, 6, generator=g)

    # 5 float32 features: a 4 KiB shard holds 200 rows, about three batches.
    capture(mlp(), batches(), store, "mlp", layers={"out": "3"}, shard_bytes=4096)
    assert store.unit_info("mlp", "out").rows == 20 * 64
    assert seen_during[-1] > 0 and seen_during[5] > 0  # shards on disk before the last batch


def test_unknown_module_names_the_modules_that_exist(store):
    with pytest.raises(InputError, match=r"model 'mlp', layer '5': module '5' not in the model "
                       r"\(modules: 0, 1, 2, 3\)"):
        capture(mlp(), [torch.zeros(2, 6)], store, "mlp", layers=["1", "5"])
    assert store.units() == []


def test_token_and_example_rows_do_not_mix(store):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = torch.nn.Linear(4, 4)
            self.pooled = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.pooled(self.tokens(x).mean(dim=1))

    with pytest.raises(InputError, match=r"layer 'tokens': gives token rows but layer 'pooled' "
                       r"gives one row per example"):
        capture(Two(), [torch.ones(2, 3, 4)], store, "two", layers=["tokens", "pooled"])
    assert store.units() == []


def test_a_failure_mid_capture_publishes_nothing(store):
    def batches():
        yield torch.ones(4, 6)
        yield torch.full((4, 6), float("nan"))

    with pytest.raises(InputError, match=r"NaN at row 4"):
        capture(mlp(), batches(), store, "mlp", layers=["0", "2"])
    assert store.units() == []
    # The rerun writes the units from scratch.
    capture(mlp(), [torch.ones(4, 6)] * 2, store, "mlp", layers=["0", "2"])
    assert store.units() == [("mlp", "0"), ("mlp", "2")]


def test_existing_units_are_refused_before_the_model_runs(store):
    calls = []

    def batches():
        calls.append(1)
        yield torch.ones(3, 6)

    capture(mlp(), batches(), store, "mlp", layers=["0"])
    with pytest.raises(InputError, match=r"layer '0': unit already exists .*overwrite"):
        capture(mlp(), batches(), store, "mlp", layers=["0"])
    assert calls == [1]
    capture(mlp(), [torch.zeros(3, 6)], store, "mlp", layers=["0"], overwrite=True)
    np.testing.assert_array_equal(store.read("mlp", "0"), mlp()[0](torch.zeros(3, 6)).detach())


def test_attributes_are_recorded_with_every_unit(store):
    capture(mlp(), [torch.ones(3, 6)], store, "mlp", layers=["0", "2"],
            attributes={"checkpoint": "step-100"})
    assert store.unit_attributes("mlp", "2") == {"checkpoint": "step-100"}


def test_repscope_imports_without_torch_and_capture_names_the_extra(tmp_path):
    """With torch and transformers unimportable: the package, the CLI and `capture`'s help
    work; using capture is one line that names the extra."""
    script = f"""
import importlib.abc
import sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"No module named {{name!r}}")

sys.meta_path.insert(0, Missing())
import repscope.store.capture as capture_mod
from repscope.jobs.cli import main
from repscope.errors import RepscopeError
try:
    capture_mod.capture(object(), [], {str(tmp_path / 's.zarr')!r}, "m", layers=["x"])
except ImportError as exc:
    assert isinstance(exc, RepscopeError), exc
    print("API:", exc)
sys.exit(main(["capture", {str(tmp_path / 's2.zarr')!r}, "m", "--hf", {str(tmp_path)!r},
               "--text", "t.txt"]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert "API: capture needs torch, which is not installed: pip install 'repscope[capture]'" \
        in proc.stdout
    assert proc.stderr.strip() == ("repscope capture: error: capture needs torch, which is not "
                                   "installed: pip install 'repscope[capture]'")
    assert proc.returncode == 1
    assert not (tmp_path / "s2.zarr").exists()
