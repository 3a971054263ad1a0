"""Job spec parsing: every refusal names the field; YAML is data, never code."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from repscope.errors import InputError, NotFoundError, SpecError
from repscope.jobs.spec import load_spec, parse_bytes, parse_spec, spec_from_dict

GOOD = """
store: s3://bucket/acts.zarr
models: [bert-seed1, bert-seed2]
layers: [layer3, layer7]
metrics: [linear_cka, pwcca, procrustes]
output: s3://bucket/results/run.zarr
rows: {start: 0, stop: 100000}
storage_options: {anon: false}
compute: {workers: auto, precision: float32}
"""


def test_full_spec_parses():
    spec = parse_spec(GOOD)
    assert spec.store == "s3://bucket/acts.zarr"
    assert spec.models == ("bert-seed1", "bert-seed2")
    assert spec.layers == ("layer3", "layer7")
    assert spec.metrics == ("linear_cka", "pwcca", "procrustes")
    assert spec.rows == (0, 100000)
    assert spec.compute.workers is None and spec.compute.precision == "float32"
    assert "storage_options" not in spec.to_dict()


def test_minimal_spec_defaults():
    spec = parse_spec("store: a.zarr\nmetrics: linear_cka\noutput: r.zarr\n")
    assert spec.models is None and spec.layers is None and spec.rows == (0, None)
    assert spec.metrics == ("linear_cka",)


def test_rank_keys_default_and_override():
    """compute.eig_floor: auto (derived from the precision) or a relative cut;
    compute.ambiguous_rank: recompute (default) or refuse. Both survive to_dict()."""
    base = "store: a.zarr\nmetrics: [mean_cca]\noutput: r.zarr\n"
    spec = parse_spec(base)
    assert spec.compute.eig_floor is None and spec.compute.ambiguous_rank == "recompute"
    assert spec.to_dict()["compute"]["eig_floor"] == "auto"
    spec = parse_spec(base + "compute: {eig_floor: 1.0e-6, ambiguous_rank: refuse}\n")
    assert spec.compute.eig_floor == 1e-6 and spec.compute.ambiguous_rank == "refuse"
    assert spec_from_dict(spec.to_dict()) == spec
    assert parse_spec(base + "compute: {eig_floor: 0}\n").compute.eig_floor == 0.0
    assert parse_spec(base + "compute: {eig_floor: auto}\n").compute.eig_floor is None


@pytest.mark.parametrize("value", ["1.5", "-1e-9", "yes", "true", "[1e-6]", "lots"])
def test_bad_eig_floor_is_refused_by_name(value):
    with pytest.raises(SpecError, match=r"compute.eig_floor must be 'auto' or a number"):
        parse_spec(f"store: a\nmetrics: [mean_cca]\noutput: o\ncompute: {{eig_floor: {value}}}\n")


def test_bad_ambiguous_rank_is_refused_by_name():
    with pytest.raises(SpecError, match=r"compute.ambiguous_rank must be one of recompute, refuse"):
        parse_spec("store: a\nmetrics: [mean_cca]\noutput: o\ncompute: {ambiguous_rank: ok}\n")


def test_per_model_layers():
    spec = parse_spec(
        "store: a\nmetrics: [linear_cka]\noutput: o\nlayers: {m1: [l1, l2], m2: [l3]}\n"
    )
    assert spec.layers == {"m1": ("l1", "l2"), "m2": ("l3",)}


@pytest.mark.parametrize(
    "text, match",
    [
        ("store: a\nmetrics: [linear_cka]\noutput: o\nmodles: [x]\n",
         r"unknown key 'modles'.*'models'"),
        ("metrics: [linear_cka]\noutput: o\n", r"missing required key 'store'"),
        ("store: a\noutput: o\n", r"missing required key 'metrics'"),
        ("store: a\nmetrics: [linear_cka]\n", r"missing required key 'output'"),
        ("store: a\nmetrics: [linear_ckaa]\noutput: o\n", r"linear_ckaa.*linear_cka"),
        ("store: a\nmetrics: [cka]\noutput: o\n", r"cka"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\nrows: {start: 5, stop: 5}\n",
         r"rows.stop \(5\) must be greater than rows.start \(5\)"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\nrows: {begin: 1}\n", r"rows.begin"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\nrows: {start: -1}\n", r"rows.start"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\ncompute: {precision: float16}\n",
         r"compute.precision must be one of float32, float64"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\ncompute: {wrokers: 2}\n",
         r"compute.wrokers.*compute.workers|'compute.wrokers' \(did you mean 'workers'"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\ncompute: {workers: 0}\n", r"compute.workers"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\ncompute: {memory_per_worker: lots}\n",
         r"compute.memory_per_worker"),
        ("store: a\nmetrics: [linear_cka, linear_cka]\noutput: o\n", r"more than once"),
        ("store: 3\nmetrics: [linear_cka]\noutput: o\n", r"'store' must be a URL"),
        ("- just\n- a list\n", r"a job spec is a mapping"),
        ("store: a\nmetrics: [linear_cka]\noutput: o\nstorage_options: [1]\n",
         r"'storage_options' must be a mapping"),
    ],
)
def test_bad_specs_name_the_field(text, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(text, source="job.yaml")


def test_spec_errors_are_input_errors_with_exit_code_2():
    with pytest.raises(InputError) as info:
        parse_spec("store: a\n")
    assert info.value.exit_code == 2


def test_malformed_yaml_gives_line_number():
    text = "store: a\nmetrics: [linear_cka\noutput: o\n"
    with pytest.raises(SpecError, match=r"job.yaml: malformed YAML at line \d+, column \d+"):
        parse_spec(text, source="job.yaml")


def test_yaml_is_data_not_code():
    text = (
        "store: !!python/object/apply:os.system ['echo pwned']\n"
        "metrics: [linear_cka]\noutput: o\n"
    )
    with pytest.raises(SpecError, match="malformed YAML"):
        parse_spec(text)


def test_environment_is_not_expanded(monkeypatch):
    monkeypatch.setenv("SECRET_BUCKET", "leaked")
    spec = parse_spec("store: s3://$SECRET_BUCKET/a\nmetrics: [linear_cka]\noutput: o\n")
    assert spec.store == "s3://$SECRET_BUCKET/a"


def test_missing_spec_file(tmp_path):
    with pytest.raises(NotFoundError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "value, expected",
    [("2GiB", 2 << 30), ("512 MB", 512 << 20), ("1.5g", int(1.5 * (1 << 30))), (4096, 4096)],
)
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
valid_metrics = st.lists(
    st.sampled_from(["linear_cka", "linear_cka_debiased", "mean_cca", "mean_sq_cca", "svcca",
                     "pwcca", "procrustes"]),
    min_size=1, max_size=7, unique=True,
)


@settings(max_examples=60, deadline=None)
@given(
    models=st.none() | st.lists(names, min_size=1, max_size=4, unique=True),
    metrics=valid_metrics,
    start=st.integers(0, 1000),
    length=st.integers(1, 1000),
    extra=st.none() | names,
)
def test_spec_roundtrip_or_named_refusal(models, metrics, start, length, extra):
    """Any mapping either parses to what it says, or is refused naming the bad key."""
    raw = {"store": "s.zarr", "metrics": metrics, "output": "o.zarr",
           "rows": {"start": start, "stop": start + length}}
    if models is not None:
        raw["models"] = models
    if extra is not None:
        raw[extra] = 1
    text = yaml.safe_dump(raw)
    known = {"store", "models", "layers", "metrics", "output", "rows", "storage_options", "compute"}
    if extra is not None and extra not in known:
        with pytest.raises(SpecError, match=f"unknown key '{extra}'"):
            parse_spec(text)
        return
    try:
        spec = parse_spec(text)
    except SpecError:
        assert extra in known  # a known key with a wrong value (e.g. layers: 1) is refused
        return
    assert spec.metrics == tuple(metrics)
    assert spec.rows == (start, start + length)
    assert spec.models == (tuple(models) if models is not None else None)
    assert spec_from_dict(yaml.safe_load(text)) == spec


# --- resource bombs: a spec stays small, and so does every message about it -------------

BASE = "store: a\noutput: o\nmetrics: [linear_cka]\n"


def alias_bomb(levels: int) -> str:
    """'Billion laughs': each level lists the previous one nine times (9**levels values)."""
    text = "storage_options:\n  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for k in range(1, levels + 1):
        text += f"  l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 9)}]\n"
    return text + f"store: *l{levels}\noutput: o\nmetrics: [linear_cka]\n"


@pytest.mark.parametrize("levels", [6, 8, 10])
def test_an_alias_bomb_is_refused_in_one_short_line(levels):
    import time

    text = alias_bomb(levels)
    assert len(text) < 700
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="YAML aliases expand this spec to more than 100,000 "
                       "values") as info:
        parse_spec(text, source="job.yaml")
    assert time.perf_counter() - t0 < 5  # not seconds of expansion, not gigabytes
    assert len(str(info.value)) < 200


def test_a_value_echoed_in_an_error_is_cut_short():
    # small enough to expand (729 values), but its repr would be kilobytes
    with pytest.raises(SpecError, match=r"'store' must be a URL or path string") as info:
        parse_spec(alias_bomb(2))
    assert len(str(info.value)) < 200
    with pytest.raises(SpecError, match="unknown key") as info:
        parse_spec(BASE + "? " + "x" * 100_000 + "\n: 1\n")  # an explicit (long) key
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("text, match", [
    (BASE + "models: &a [m, *a]\n", "a YAML alias refers to the value that contains it"),
    (BASE + "models: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
    (BASE + "rows: {stop: " + "9" * 5000 + "}\n", "malformed YAML: Exceeds the limit"),
    (BASE + "rows: {stop: " + "9" * 40 + "}\n", r"rows.stop must be an integer from 0 to"),
])
def test_pathological_yaml_is_one_line(text, match):
    with pytest.raises(SpecError, match=match) as info:
        parse_spec(text)
    assert len(str(info.value)) < 300


def test_anchors_within_reason_still_work():
    spec = parse_spec("store: a\noutput: o\nmetrics: &m [linear_cka]\n"
                      "layers: {a: &l [l1, l2], b: *l}\n")
    assert spec.layers == {"a": ("l1", "l2"), "b": ("l1", "l2")}


def test_spec_files_that_cannot_be_specs(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "#" * (2 << 20) + "\n")
    with pytest.raises(SpecError, match=r"big.yaml' is 2.0 MiB; a spec is a small YAML file"):
        load_spec(big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"store: \xff\xfe\n")
    with pytest.raises(SpecError, match="is not UTF-8 text"):
        load_spec(binary)
    with pytest.raises(SpecError, match="is not a file"):
        load_spec(tmp_path)


@pytest.mark.parametrize("value", [
    "inf", ".inf", "-.inf", ".nan", "nan", "-1GiB", "0", "0.0001", "1e30GiB", "2048TiB",
    "99999999999999999999999999", "true", "[1]", "{a: 1}", "1 GiB GiB",
])
def test_memory_per_worker_must_be_a_real_size(value):
    with pytest.raises(SpecError, match=r"job.yaml: compute.memory_per_worker must be a size "
                                        r"from 1 KiB to 1 PiB") as info:
        parse_spec(BASE + f"compute: {{memory_per_worker: {value}}}\n", source="job.yaml")
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("value, expected", [
    ("6KiB", 6 << 10), ("1TiB", 1 << 40), ("1PiB", 1 << 50), (2e9, 2_000_000_000),
    ("2e9", 2_000_000_000), (1024, 1024),
])
def test_memory_per_worker_accepts_sizes(value, expected):
    assert parse_spec(BASE + f"compute: {{memory_per_worker: {value}}}\n"
                      ).compute.memory_per_worker == expected


@pytest.mark.parametrize("compute, match", [
    ("{workers: 100000000000000000000000}", r"compute.workers must be an integer from 1 to"),
    ("{workers: 1e23}", r"compute.workers must be an integer from 1 to"),
    ("{checkpoint_seconds: .nan}", r"compute.checkpoint_seconds must be a finite number"),
    ("{checkpoint_seconds: .inf}", r"compute.checkpoint_seconds must be a finite number"),
    ("{bootstrap: 1000000000}", r"compute.bootstrap must be an integer from 0 to"),
    ("{bootstrap_shards: 1000000000}", r"compute.bootstrap_shards must be an integer from 2"),
    ("{block_rows: 100000000000000}", r"compute.block_rows must be an integer from 1 to"),
    ("{svcca_threshold: .nan}", r"compute.svcca_threshold must be in \(0, 1\]"),
])
def test_absurd_counts_are_refused_naming_the_field(compute, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(BASE + f"compute: {compute}\n")
