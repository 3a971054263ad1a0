"""`repscope capture` on Hugging Face checkpoints in local folders, one checkpoint in this
process: hidden states exactly, token and pooled rows, pre-tokenized ids, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from repscope.jobs.cli import main
from repscope.store import ActivationStore
from tests.capture.conftest import LINES, direct_hidden_states


def capture(*args) -> int:
    return main(["capture", *map(str, args)])


def test_hidden_states_are_stored_exactly_as_token_rows(checkpoints, probes, tmp_path, capsys):
    store_url = tmp_path / "acts.zarr"
    assert capture(store_url, "bert-seed0", "--hf", checkpoints["seed0"], "--text", probes,
                   "--batch-size", 3, "--json") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [c["model"] for c in summary["captured"]] == ["bert-seed0"]
    store = ActivationStore.open(str(store_url))
    assert store.layers("bert-seed0") == ["embeddings", "layer1", "layer2"]
    direct = direct_hidden_states(checkpoints["seed0"], LINES, batch_size=3)
    for unit, expected in direct.items():
        np.testing.assert_array_equal(store.read("bert-seed0", unit), expected)  # float32 exact
    lengths = [len(line.split()) + 2 for line in LINES]  # word-level tokens + [CLS], [SEP]
    np.testing.assert_array_equal(store.example_index(), np.repeat(np.arange(8), lengths))
    np.testing.assert_array_equal(store.padding_mask(),
                                  np.arange(max(lengths))[None, :] >= np.array(lengths)[:, None])
    ids = store.row_ids()
    assert len(ids) == 8 and ids[0].startswith("0:") and len(set(ids)) == 8
    attrs = store.unit_attributes("bert-seed0", "layer2")["capture"]
    assert attrs["output"] == "hidden_states[2]" and attrs["pool"] == "none"


@pytest.mark.parametrize("pool", ["mean", "first", "last"])
def test_pooled_rows_one_per_example(checkpoints, probes, tmp_path, pool):
    store_url = tmp_path / f"{pool}.zarr"
    assert capture(store_url, "m", "--hf", checkpoints["seed1"], "--text", probes,
                   "--pool", pool, "--batch-size", 4) == 0
    store = ActivationStore.open(str(store_url))
    direct = direct_hidden_states(checkpoints["seed1"], LINES, batch_size=4, pool=pool)
    for unit, expected in direct.items():
        got = store.read("m", unit)
        assert got.shape == (8, 16)
        if pool == "mean":
            np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, expected)
    assert store.example_index() is None and len(store.row_ids()) == 8


def test_pre_tokenized_ids_give_the_same_rows_as_text(checkpoints, probes, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["seed0"], local_files_only=True)
    enc = tokenizer(LINES, padding="max_length", max_length=20, return_tensors="np")
    np.savez(tmp_path / "ids.npz", input_ids=enc["input_ids"],
             attention_mask=enc["attention_mask"])
    assert capture(tmp_path / "ids.zarr", "m", "--hf", checkpoints["seed0"],
                   "--ids", tmp_path / "ids.npz", "--batch-size", 3) == 0
    assert capture(tmp_path / "text.zarr", "m", "--hf", checkpoints["seed0"],
                   "--text", probes, "--batch-size", 3) == 0
    from_ids = ActivationStore.open(str(tmp_path / "ids.zarr"))
    from_text = ActivationStore.open(str(tmp_path / "text.zarr"))
    assert from_ids.row_fingerprint == from_text.row_fingerprint
    for unit in ("embeddings", "layer2"):
        np.testing.assert_array_equal(from_ids.read("m", unit), from_text.read("m", unit))
    # So a model captured from the padded ids joins the store captured from the text.
    assert capture(tmp_path / "text.zarr", "m2", "--hf", checkpoints["seed1"],
                   "--ids", tmp_path / "ids.npz") == 0


def test_layers_subset_and_a_module_path(checkpoints, probes, tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = "encoder.layer.1.attention.output"
    assert capture(tmp_path / "s.zarr", "m", "--hf", checkpoints["seed0"], "--text", probes,
                   "--layers", f"layer2,{path}", "--batch-size", 8) == 0
    store = ActivationStore.open(str(tmp_path / "s.zarr"))
    assert store.layers("m") == [path, "layer2"]  # natural order
    model = AutoModel.from_pretrained(checkpoints["seed0"], local_files_only=True).eval()
    enc = AutoTokenizer.from_pretrained(checkpoints["seed0"], local_files_only=True)(
        LINES, padding=True, return_tensors="pt")
    seen = []
    handle = model.get_submodule(path).register_forward_hook(
        lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        model(**enc)
    handle.remove()
    keep = enc["attention_mask"].numpy().astype(bool)
    np.testing.assert_array_equal(store.read("m", path), seen[0].numpy()[keep])


def test_text_longer_than_the_model_takes_is_truncated_with_a_warning(checkpoints, tmp_path,
                                                                       capsys):
    long_text = tmp_path / "long.txt"
    long_text.write_text("the cat\n" + " ".join(["dog"] * 40) + "\n")
    assert capture(tmp_path / "s.zarr", "m", "--hf", checkpoints["seed0"], "--text",
                   long_text) == 0
    err = capsys.readouterr().err
    assert (f"warning: 1 of 2 examples of {long_text} are longer than 32 tokens and were "
            "truncated (first: line 2, 42 tokens)") in err
    store = ActivationStore.open(str(tmp_path / "s.zarr"))
    assert store.n_rows == 4 + 32


def test_rerun_skips_units_complete_for_the_same_checkpoint_and_inputs(checkpoints, probes,
                                                                       tmp_path, capsys):
    store_url = tmp_path / "s.zarr"
    args = [store_url, "m", "--hf", checkpoints["seed0"], "--text", probes]
    assert capture(*args, "--layers", "embeddings") == 0
    before = ActivationStore.open(str(store_url)).unit_info("m", "embeddings").fingerprint
    capsys.readouterr()
    assert capture(*args, "--json") == 0  # embeddings complete: only layer1, layer2 run
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["captured"][0]["units"] == ["layer1", "layer2"]
    assert capture(*args, "--json") == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["skipped"] == ["m"]
    assert "m: skipped, every unit is complete for the same checkpoint and inputs" in out.err
    store = ActivationStore.open(str(store_url))
    assert store.unit_info("m", "embeddings").fingerprint == before
    # Another checkpoint under the same name: refused, or replaced with --overwrite.
    other = [store_url, "m", "--hf", checkpoints["seed1"], "--text", probes]
    assert capture(*other) == 2
    assert ("layer 'embeddings': unit already exists in store" in capsys.readouterr().err)
    assert capture(*other, "--overwrite") == 0
    store.refresh()
    assert store.unit_info("m", "embeddings").fingerprint != before


# -- bad input: one line, exit 2, nothing written ----------------------------------------------


def _not_a_model(tmp_path, checkpoints):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    return ["--hf", folder], rf"model 'm' \(checkpoint {folder}\): not a Hugging Face " \
        r"checkpoint: no config.json"


def _broken_config(tmp_path, checkpoints):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints["seed0"], folder)
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return ["--hf", folder], r"not a model transformers can load"


def _empty_text(tmp_path, checkpoints):
    (tmp_path / "probes.txt").write_text("\n  \n")
    return [], r"text file .*probes.txt holds no examples \(one example per line\)"


def _unknown_layer(tmp_path, checkpoints):
    return ["--layers", "layer1,layer7"], (
        r"model 'm', layer 'layer7': no such layer in checkpoint .*: its layers are embeddings, "
        r"layer1, layer2, or a module path such as 'encoder.layer.0'; did you mean 'layer2', "
        r"'layer1'\?$")


def _too_long_for_the_model(tmp_path, checkpoints):
    return ["--max-length", 64], r"max_length 64 is longer than the 32 tokens it takes"


def _tokenizers_differ(tmp_path, checkpoints):
    return ["--hf", f"other={checkpoints['other_vocab']}"], (
        r"model 'other' \(checkpoint .*other_vocab\): its tokenizer gives other tokens than "
        r"that of 'm' \(line 1 of .*: different token ids\): rows would not align")


def _ids_too_long(tmp_path, checkpoints):
    np.savez(tmp_path / "ids.npz", input_ids=np.ones((3, 40), np.int64))
    return ["--ids", tmp_path / "ids.npz"], (
        r"example 0 of .*ids.npz has 40 tokens; the model takes at most 32: shorten the inputs")


def _ids_past_vocabulary(tmp_path, checkpoints):
    np.savez(tmp_path / "ids.npz", input_ids=np.full((3, 5), 500),
             attention_mask=np.ones((3, 5), np.int8))
    return ["--ids", tmp_path / "ids.npz"], r"up to 500, but the vocabulary has 26 tokens$"


def _cuda_without_a_gpu(tmp_path, checkpoints):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: this case is about its absence")
    return ["--device", "cuda"], r"device cuda: no CUDA device is visible to torch"


@pytest.mark.parametrize("case", [
    _not_a_model, _broken_config, _empty_text, _unknown_layer, _too_long_for_the_model,
    _tokenizers_differ, _ids_too_long, _ids_past_vocabulary, _cuda_without_a_gpu,
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, checkpoints, probes, tmp_path,
                                                          capsys):
    extra, pattern = case(tmp_path, checkpoints)
    hf = ["--hf", checkpoints["seed0"]]
    if "--hf" in extra and not str(extra[1]).startswith("other="):
        hf = []  # the case's checkpoint replaces seed0
    inputs = [] if "--ids" in extra else ["--text", probes]
    args = ["capture", str(tmp_path / "s.zarr")]
    if not any(str(e).startswith("other=") for e in extra):
        args.append("m")
    else:
        hf = ["--hf", f"m={checkpoints['seed0']}"]
    code = main(args + [str(a) for a in hf + inputs + extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repscope capture: error: "), err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    if case is not _cuda_without_a_gpu:
        assert not (tmp_path / "s.zarr").exists()


def test_a_store_with_other_rows_is_refused(checkpoints, probes, tmp_path, capsys):
    store_url = tmp_path / "s.zarr"
    assert capture(store_url, "m", "--hf", checkpoints["seed0"], "--text", probes) == 0
    assert capture(store_url, "other", "--hf", checkpoints["other_vocab"], "--text",
                   probes) == 2
    assert ("model 'other': these inputs (" in capsys.readouterr().err)
    assert capture(store_url, "pooled", "--hf", checkpoints["seed1"], "--text", probes,
                   "--pool", "mean") == 2
    assert "give other rows than the store's units" in capsys.readouterr().err
    assert ActivationStore.open(str(store_url)).models() == ["m"]
