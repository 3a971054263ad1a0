"""`repscope ground` on the demo's models and on small synthetic stores."""

from __future__ import annotations

import io
import json

import pytest

from repscope.jobs.cli import main as cli_main
from repscope.jobs.ground import one_blas_thread, run_ground
from repscope.jobs.spec import parse_spec


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's three MLPs (differ only in seed) ingested, with their test accuracies."""
    from repscope.jobs.demo import hidden_activations, train_models
    from repscope.store import ActivationStore, ingest_array

    root = tmp_path_factory.mktemp("demo")
    with one_blas_thread():  # small matrices: threaded BLAS only contends on a loaded machine
        models, x_test = train_models()
    store = ActivationStore.create(str(root / "acts.zarr"))
    lines = ["model,score"]
    for name, (mlp, accuracy) in models.items():
        for k, acts in enumerate(hidden_activations(mlp, x_test)):
            ingest_array(store, name, f"layer{k + 1}", acts)
        lines.append(f"{name},{accuracy}")
    (root / "scores.csv").write_text("\n".join(lines) + "\n")
    spec = root / "job.yaml"
    spec.write_text(f"store: {root / 'acts.zarr'}\nmetrics: [linear_cka, procrustes, mean_cca]\n"
                    f"output: {root / 'res.zarr'}\ncompute: {{precision: float64}}\n")
    return root


def test_demo_same_layer_closer_than_different_layers(demo):
    spec = parse_spec((demo / "job.yaml").read_text())
    summary = run_ground(spec, demo / "scores.csv", demo / "out", replicates=5,
                         permutations=1, fractions=(0.0, 0.5, 0.9), log=io.StringIO())
    spec_ = summary["specificity"]
    # Measured: linear CKA 0.94, Procrustes 0.94 (AUC that a corresponding-layer pair across
    # seeds is closer than a non-corresponding one).
    assert spec_["linear_cka"]["auc"] > 0.85 and spec_["procrustes"]["auc"] > 0.85
    same, diff = spec_["linear_cka"]["same_layer"], spec_["linear_cka"]["different_layer"]
    assert same["mean"] < diff["mean"] and same["count"] == 12 and diff["count"] == 36
    assert summary["probes"]["metrics"] == ["linear_cka", "procrustes", "mean_cca"]
    for files in summary["files"].values():
        for f in files:
            assert (demo / "out" / f.rsplit("/", 1)[-1]).stat().st_size > 0
    header = (demo / "out" / "matrix.csv").read_text().splitlines()[0]
    assert header.endswith("value,ci_lower,ci_upper,null_mean,null_q95")


def test_cli_json_and_errors(demo, tmp_path, capsys):
    args = ["ground", str(demo / "job.yaml"), "--scores", str(demo / "scores.csv"), "--out",
            str(tmp_path / "g"), "--bootstrap", "0", "--permutations", "0", "--pc-fractions",
            "0,0.5", "--json"]
    assert cli_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["files"]) == {"probes", "rank", "specificity", "matrix", "summary"}
    assert "bootstrap" not in out and out["rank"]["linear_cka"]["layers"] == 4

    missing = args.copy()
    missing[3] = str(tmp_path / "nope.csv")
    assert cli_main(missing) == 2
    assert "scores file" in capsys.readouterr().err

    extra = tmp_path / "extra.csv"
    extra.write_text((demo / "scores.csv").read_text() + "bert,0.5\n")
    assert cli_main([*args[:3], str(extra), *args[4:]]) == 2
    err = capsys.readouterr().err
    assert "not in store" in err and "bert" in err and err.count("\n") == 1

    two = tmp_path / "two.csv"
    two.write_text("\n".join((demo / "scores.csv").read_text().splitlines()[:3]) + "\n")
    assert cli_main([*args[:3], str(two), *args[4:]]) == 2
    assert "at least 3 models" in capsys.readouterr().err

    assert cli_main([*args[:-2], "0,2", "--json"]) == 2
    assert "--pc-fractions" in capsys.readouterr().err
