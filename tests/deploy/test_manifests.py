"""deploy/: the image definition, KubeRay manifests and the AWS launcher config.

Static checks (fast, no network): every YAML parses; KubeRay manifests use `ray.io/v1` and
the CRD field names of KubeRay 1.6; nothing looks like a literal credential; every
`repscope ...` command line in the manifests and deploy/README.md parses with the real CLI
parser; the image's Ray matches the project's. One integration test runs the CronJob's
command line against a real local `ray start` cluster (the `ray_cluster` fixture).

`repscope nightly` and `submit --nightly` are being added separately: until the parser has
them, their lines are checked with `nightly` read as `run` and `--nightly` dropped; once they
exist the lines are parsed exactly as written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from repscope.jobs.cli import build_parser
from tests.raycluster import ray_env

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
DOCKERFILE = DEPLOY / "Dockerfile"
YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
TEXT_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())
SPEC_PATH = "/config/job.yaml"

EXPECTED_KINDS = {
    "raycluster.yaml": {("ray.io/v1", "RayCluster")},
    "rayjob.yaml": {("ray.io/v1", "RayJob")},
    "raycronjob.yaml": {("ray.io/v1", "RayCronJob")},
    "cronjob.yaml": {("batch/v1", "CronJob")},
    "configmap.yaml": {("v1", "ConfigMap")},
    "serviceaccount.yaml": {("v1", "ServiceAccount")},
}

# Field names of the KubeRay 1.6 CRDs (ray-operator/apis/ray/v1). Unknown keys are typos.
RAYCLUSTER_SPEC = {
    "rayVersion", "enableInTreeAutoscaling", "authOptions", "headGroupSpec",
    "workerGroupSpecs", "autoscalerOptions", "headServiceAnnotations", "suspend",
    "managedBy", "gcsFaultToleranceOptions", "upgradeStrategy",
}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress",
              "resources", "labels"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                "template", "idleTimeoutSeconds", "suspend", "scaleStrategy", "numOfHosts",
                "resources", "labels"}
RAYJOB_SPEC = {
    "entrypoint", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
    "activeDeadlineSeconds", "rayClusterSpec", "clusterSelector", "runtimeEnvYAML",
    "metadata", "jobId", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources",
    "submitterPodTemplate", "submitterConfig", "suspend", "backoffLimit",
    "deletionStrategy", "managedBy",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
# RayCronJob (alpha in 1.6): `jobTemplate` is a RayJob spec itself (no `spec:` level).
# `timeZone` only exists from KubeRay 1.7, so it is not allowed here.
RAYCRONJOB_SPEC = {"schedule", "jobTemplate", "suspend"}
CRON = re.compile(r"^\S+( \S+){4}$")


# ---------------------------------------------------------------- helpers


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def the(kind: str) -> dict:
    found = [d for p in KUBERAY.glob("*.yaml") for d in documents(p) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kuberay, found {len(found)}"
    return found[0]


def walk(node, path=()):
    """Yield (path, value) for every mapping entry and list item, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, k), v
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*path, i), v
            yield from walk(v, (*path, i))


def pod_specs(doc) -> list[tuple[tuple, dict]]:
    """Every pod spec (the `spec` under a `template` that has `containers`)."""
    return [(p, v) for p, v in walk(doc)
            if isinstance(v, dict) and "containers" in v and p[-2:-1] == ("template",)]


def containers(doc) -> list[dict]:
    return [c for _, spec in pod_specs(doc) for c in spec["containers"]]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    return [("RayCluster", the("RayCluster")["spec"]),
            ("RayJob", the("RayJob")["spec"]["rayClusterSpec"]),
            ("RayCronJob", the("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"])]


def dockerfile_ray_version() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert match, "deploy/Dockerfile must declare ARG RAY_VERSION=<version>"
    return match.group(1)


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of container command/args: $(VAR) from the container's env
    when defined, left unchanged otherwise; $$ is a literal $."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, text)


def cronjob_line() -> str:
    """The shell line the CronJob's container runs, after Kubernetes' own expansion."""
    doc = the("CronJob")
    (container,) = containers(doc)
    assert container["command"] == ["/bin/sh", "-c"], "the CronJob runs one shell line"
    (line,) = container["args"]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return k8s_expand(line, env)


def shell_to_argv(line: str) -> list[str]:
    """A manifest's shell line as argv; the one command substitution used, $(date +%F),
    becomes today's date the way sh would expand it."""
    line = line.replace("$(date +%F)", dt.date.today().isoformat())
    assert "$(" not in line and "`" not in line, f"unexpected shell expansion in {line!r}"
    return shlex.split(line, comments=True)


def _subparsers(parser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def cli_has_nightly() -> bool:
    return "nightly" in _subparsers(build_parser())


def submit_has_nightly() -> bool:
    return "--nightly" in _subparsers(build_parser())["submit"]._option_string_actions


def parse_repscope(argv: list[str]) -> argparse.Namespace:
    """Parse `repscope ...` with the real CLI parser; exact once nightly support exists."""
    assert argv[0] == "repscope", argv
    args = list(argv[1:])
    if args and args[0] == "nightly" and not cli_has_nightly():
        args[0] = "run"  # same arguments as run, per the nightly design
    if "--nightly" in args and not submit_has_nightly():
        args.remove("--nightly")
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"repscope rejects the command line: {shlex.join(argv)}")


# ---------------------------------------------------------------- parsing and kinds


def test_deploy_folder_has_the_expected_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in TEXT_FILES}
    assert {"Dockerfile", "README.md", "aws/cluster.yaml",
            *(f"kuberay/{n}" for n in EXPECTED_KINDS)} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_parses(path):
    docs = documents(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_kubernetes_manifests_have_kind_and_api_version(name):
    docs = documents(KUBERAY / name)
    assert {(d.get("apiVersion"), d.get("kind")) for d in docs} == EXPECTED_KINDS[name]
    for d in docs:
        assert d["metadata"]["name"], f"{name}: metadata.name"
        if d["kind"].startswith("Ray"):
            assert d["apiVersion"] == "ray.io/v1"


# ---------------------------------------------------------------- CRD field names


@pytest.mark.parametrize("where,spec", [pytest.param(w, s, id=w) for w, s in ray_cluster_specs()])
def test_ray_cluster_specs_use_crd_field_names(where, spec):
    assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown keys {set(spec) - RAYCLUSTER_SPEC}"
    assert spec["rayVersion"] == dockerfile_ray_version(), where
    assert spec["authOptions"]["mode"] == "token", f"{where}: token authentication"

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP, f"{where}: headGroupSpec keys {set(head) - HEAD_GROUP}"
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), \
        "rayStartParams values are strings"
    assert head["template"]["spec"]["containers"][0]["image"]

    groups = spec["workerGroupSpecs"]
    assert isinstance(groups, list) and groups
    for g in groups:
        assert set(g) <= WORKER_GROUP, f"{where}: worker group keys {set(g) - WORKER_GROUP}"
        for key in ("groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams",
                    "template"):
            assert key in g, f"{where}: workerGroupSpecs[].{key}"
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert isinstance(g["rayStartParams"], dict)
        assert g["template"]["spec"]["containers"][0]["image"]


def test_raycluster_names_the_token_secret_the_cronjob_uses():
    secret = the("RayCluster")["spec"]["authOptions"]["secretName"]
    env = {e["name"]: e for e in containers(the("CronJob"))[0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret, "key": "auth_token"}


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_rayjob_specs(kind):
    doc = the(kind)
    spec = doc["spec"]["jobTemplate"] if kind == "RayCronJob" else doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"{kind}: unknown RayJob keys {set(spec) - RAYJOB_SPEC}"
    assert isinstance(spec["entrypoint"], str)
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), \
        "exactly one of rayClusterSpec / clusterSelector"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    # the spec is mounted where the driver (the head pod) reads it
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = [m for c in head["containers"] for m in c.get("volumeMounts", [])]
    assert any(SPEC_PATH.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts)


def test_raycronjob_fields_and_alpha_note():
    doc = the("RayCronJob")
    spec = doc["spec"]
    assert set(spec) <= RAYCRONJOB_SPEC, f"unknown RayCronJob keys {set(spec) - RAYCRONJOB_SPEC}"
    assert CRON.match(spec["schedule"])
    assert "spec" not in spec["jobTemplate"], "jobTemplate is a RayJob spec, no spec: level"
    text = (KUBERAY / "raycronjob.yaml").read_text()
    assert "alpha" in text.lower() and "RayCronJob" in text and "feature gate" in text
    readme = (DEPLOY / "README.md").read_text()
    assert "alpha" in readme.lower() and "feature gate" in readme


def test_cronjob_is_a_portable_nonoverlapping_schedule():
    spec = the("CronJob")["spec"]
    assert CRON.match(spec["schedule"])
    assert spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")


def test_pods_use_the_service_account_and_existing_configmaps():
    sa = the("ServiceAccount")["metadata"]["name"]
    configmaps = {the("ConfigMap")["metadata"]["name"]}
    for kind in ("RayCluster", "RayJob", "RayCronJob"):
        for _, spec in pod_specs(the(kind)):
            assert spec.get("serviceAccountName") == sa, f"{kind}: serviceAccountName"
    for kind in ("RayCluster", "RayJob", "RayCronJob", "CronJob"):
        for _, spec in pod_specs(the(kind)):
            for vol in spec.get("volumes", []):
                if "configMap" in vol:
                    assert vol["configMap"]["name"] in configmaps, f"{kind}: {vol}"


def test_configmap_holds_a_valid_job_spec():
    from repscope.jobs.spec import parse_spec

    spec = parse_spec(the("ConfigMap")["data"]["job.yaml"], "configmap.yaml")
    assert spec.store.startswith(("s3://", "gs://")) and spec.output.startswith(("s3://", "gs://"))
    assert spec.storage_options == {}, "no credentials in the spec"


# ---------------------------------------------------------------- credentials

CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|PRIVATE", re.I)
CREDENTIAL_TEXT = [
    re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b"),            # AWS key ids
    re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),  # AWS secret keys
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),                      # GitHub tokens
    re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"),                        # Google API keys
    re.compile(r"\bxox[abpr]-[A-Za-z0-9-]{10,}"),                     # Slack tokens
    # NAME=literal / name: literal for secret-ish names (not $VAR, $(cmd) or <placeholder>)
    re.compile(r"(?i)\b\w*(?:secret|token|password|access_key)(?:_[a-z_]*)?\s*[=:]\s*[\"']?"
               r"(?![\"'$<{(])[A-Za-z0-9/+_\-.]{16,}"),
]


def credential_hits(text: str) -> list[str]:
    return [m.group(0) for rx in CREDENTIAL_TEXT for m in rx.finditer(text)]


def test_credential_scanner_catches_literals():
    # built at run time so that no scanner flags this file
    key_id = "AKIA" + "Q" * 16
    secret = "wJalrXUtnFEMI" + "K7MDENG" + "bPxRfiCYEXAMPLEKEYab"
    assert credential_hits(f"id: {key_id}")
    assert credential_hits(f"aws_secret_access_key = {secret}")
    assert credential_hits("RAY_AUTH_TOKEN=" + "0123456789abcdef" * 2)
    assert not credential_hits('RAY_AUTH_TOKEN="$(kubectl get secret x)"')
    assert not credential_hits("secretName: repscope-ray-token")


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_no_literal_credentials_in_deploy_files(path):
    assert credential_hits(path.read_text()) == []


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_secret_env_values_come_from_secrets(path):
    for doc in documents(path):
        assert doc.get("kind") != "Secret", f"{path}: create Secrets out of band, not here"
        for keypath, _ in walk(doc):
            key = keypath[-1]
            if isinstance(key, str) and re.fullmatch(r"(?i)aws_(access_key_id|secret_access_key"
                                                     r"|session_token)", key):
                pytest.fail(f"{path}: {'.'.join(map(str, keypath))} holds a credential")
        for c in containers(doc):
            for e in c.get("env", []):
                if CREDENTIAL_NAME.search(e["name"]):
                    assert "value" not in e, f"{path}: env {e['name']} is a literal"
                    assert "secretKeyRef" in e["valueFrom"], f"{path}: env {e['name']}"
            for src in c.get("envFrom", []):
                assert set(src) <= {"secretRef", "configMapRef", "prefix"}


def test_dockerfile_bakes_in_no_secrets():
    for line in DOCKERFILE.read_text().splitlines():
        m = re.match(r"\s*(ENV|ARG)\s+(.*)", line)
        if m:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", m.group(2)) or [m.group(2).split()[0]]
            for name in names:
                assert not CREDENTIAL_NAME.search(name), f"Dockerfile {m.group(1)} {name}"


# ---------------------------------------------------------------- command lines


def manifest_command_lines() -> dict[str, list[str]]:
    return {
        "RayJob": shlex.split(the("RayJob")["spec"]["entrypoint"]),
        "RayCronJob": shlex.split(the("RayCronJob")["spec"]["jobTemplate"]["entrypoint"]),
        "CronJob": shell_to_argv(cronjob_line()),
    }


@pytest.mark.parametrize("where", ["RayJob", "RayCronJob", "CronJob"])
def test_manifest_command_lines_parse(where):
    argv = manifest_command_lines()[where]
    args = parse_repscope(argv)
    assert args.spec == SPEC_PATH
    if where == "RayJob":
        assert argv[1] == "run" and args.command == "run"
    elif where == "RayCronJob":
        assert argv[1] == "nightly"
        assert args.command == ("nightly" if cli_has_nightly() else "run")
    else:
        assert args.command == "submit" and args.wait
        assert "--nightly" in argv
        if submit_has_nightly():
            assert args.nightly is True
        assert re.fullmatch(r"https?://[\w.-]+:8265", args.address)
        assert re.fullmatch(r"nightly-\d{4}-\d{2}-\d{2}", args.submission_id)
        from repscope.jobs.submit import _SUBMISSION_ID
        assert _SUBMISSION_ID.match(args.submission_id)


def readme_command_lines() -> list[list[str]]:
    """`repscope ...` lines in the shell blocks of deploy/README.md (env prefixes dropped)."""
    text = (DEPLOY / "README.md").read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not re.match(r"\s*(?:[A-Z_]+=\S*\s+)*repscope\s", line):
                continue
            argv = shell_to_argv(line)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv and argv[0] == "repscope":
                lines.append(argv)
    return lines


def test_readme_shows_the_cronjob_command_verbatim():
    assert (cronjob_line()) in (DEPLOY / "README.md").read_text()


def test_readme_command_lines_parse():
    lines = readme_command_lines()
    assert len(lines) >= 5
    for argv in lines:
        parse_repscope(argv)


# ---------------------------------------------------------------- image and Ray versions


def test_dockerfile_installs_repscope_with_a_matching_ray():
    text = DOCKERFILE.read_text()
    version = dockerfile_ray_version()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", text, re.M)
    for what in ("pyproject.toml", "README.md"):  # README.md: pyproject's readme
        assert re.search(rf"^COPY .*\b{re.escape(what)}\b", text, re.M), what
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    for folder in folders:  # every folder the build maps into the repscope package
        assert re.search(rf"^COPY .*\s{folder}\s", text, re.M), folder
    assert '".[s3,gcs]"' in text
    assert '"ray[default]==${RAY_VERSION}"' in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as non-root"

    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("!pyproject.toml", "!README.md", *(f"!{f}/**" for f in folders)):
        assert needed in ignore

    (ray_req,) = [Requirement(r) for r in pyproject["project"]["dependencies"]
                  if Requirement(r).name == "ray"]
    assert version in ray_req.specifier, f"image Ray {version} outside {ray_req}"
    assert version == importlib.metadata.version("ray"), (
        f"image Ray {version} differs from the Ray the project is tested with "
        f"({importlib.metadata.version('ray')}): bump RAY_VERSION, rayVersion and tags together"
    )


def test_manifests_run_the_image_of_that_ray_version():
    version = dockerfile_ray_version()
    for kind in ("RayCluster", "RayJob", "RayCronJob", "CronJob"):
        for c in containers(the(kind)):
            assert c["image"].endswith(f"-ray{version}"), f"{kind}: {c['image']}"


def test_aws_launcher_config():
    (cfg,) = documents(DEPLOY / "aws" / "cluster.yaml")
    version = dockerfile_ray_version()
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert len(cfg["available_node_types"]) >= 2, "head and worker node types"
    for name, node in cfg["available_node_types"].items():
        arn = node["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "repscope[s3]" in setup
    assert f"ray[default]=={version}" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in " ".join(cfg[key])


# ---------------------------------------------------------------- integration


def test_cronjob_command_runs_against_a_local_cluster(ray_cluster, tmp_path):
    """The CronJob's own shell line, pointed at a loopback `ray start` cluster."""
    import numpy as np
    import xarray as xr

    from repscope.store import ActivationStore, ingest_array

    rng = np.random.default_rng(7)
    store = ActivationStore.create(str(tmp_path / "acts.zarr"))
    base = rng.standard_normal((120, 6))
    for model in ("m1", "m2"):
        for i, layer in enumerate(("l1", "l2")):
            acts = np.tanh(base @ rng.standard_normal((6, 4 + i)))
            ingest_array(store, model, layer, acts.astype(np.float32))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"store: {tmp_path / 'acts.zarr'}\noutput: {tmp_path / 'results.zarr'}\n"
                    "metrics: [linear_cka]\n")

    line = cronjob_line()
    assert SPEC_PATH in line and "--address " in line
    line = line.replace(SPEC_PATH, shlex.quote(str(spec)))
    line = re.sub(r"--address \S+", f"--address {ray_cluster.dashboard}", line)
    # the session's cluster is shared: keep the dated id, make it unique to this test
    tag = f"deploy-{uuid.uuid4().hex[:8]}-"
    line = line.replace("--submission-id nightly-", f"--submission-id {tag}nightly-")
    if not submit_has_nightly():
        line = line.replace(" --nightly", "")

    env = ray_env()
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # .venv/bin/repscope
    result = subprocess.run(["/bin/sh", "-c", line], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    submitted = result.stdout.strip().splitlines()[0]
    assert re.fullmatch(rf"{tag}nightly-\d{{4}}-\d{{2}}-\d{{2}}", submitted), submitted
    assert "SUCCEEDED" in result.stderr

    ds = xr.open_zarr(tmp_path / "results.zarr")
    cka = ds["linear_cka"].values
    assert cka.shape == (4, 4)
    assert np.allclose(np.diag(cka), 1.0, atol=1e-6)
