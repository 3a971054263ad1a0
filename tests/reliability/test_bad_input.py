"""Bad input through the CLI: exit code 2, one line naming the culprit, nothing written."""

from __future__ import annotations

import numpy as np

from repscope.jobs.cli import main
from repscope.store import ActivationStore, ingest_array


def test_zero_variance_unit_named_for_cca(tmp_path, capsys, embedded_ray):
    store = ActivationStore.create(str(tmp_path / "acts.zarr"))
    rng = np.random.default_rng(0)
    ingest_array(store, "m", "good", rng.standard_normal((200, 4)).astype(np.float32))
    ingest_array(store, "m", "dead", np.ones((200, 3), dtype=np.float32))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {tmp_path / 'acts.zarr'}\noutput: {tmp_path / 'r.zarr'}\n"
                    "metrics: [mean_cca]\n")
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "m/dead" in err and "Traceback" not in err
    assert not (tmp_path / "r.zarr").exists() and not (tmp_path / "r.zarr.lock").exists()


def test_unknown_metric_suggests_closest(tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text("store: s.zarr\noutput: o.zarr\nmetrics: [procrustez]\n")
    assert main(["run", str(spec)]) == 2
    assert "did you mean 'procrustes'" in capsys.readouterr().err
