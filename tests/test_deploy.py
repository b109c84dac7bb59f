"""`triton-builder deploy`: what it writes, checked with the real tool of each format (hadolint,
the Compose specification's schema, promtool, kubectl kustomize + kubernetes-validate --strict), and
what it decides from a repository (image, pinned packages, GPUs, decoupled models).

The tools come from `make setup` (PyPI dev extras, Debian's prometheus, .tools/compose_spec.json);
a test whose tool is absent is skipped with the reason. No Docker engine or cluster runs here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from builder.cli import app
from builder.manifest import MANIFEST, SCHEMA

sys.path.insert(0, str(Path(__file__).parent))
from test_perf_server import make_toy_repo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMPOSE_SCHEMA = ROOT / ".tools" / "compose_spec.json"


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}:/usr/bin:/usr/local/bin")
    if path is None:
        pytest.skip(f"{name} is not installed (make setup installs it)")
    return path


def run(argv: list, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


GPU_MODEL = '''
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "emb" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_GPU count: 2 gpus: [ 0, 1 ] }} ]
parameters {{ key: "runner" value: {{ string_value: "{runner}" }} }}
parameters {{ key: "device" value: {{ string_value: "gpu" }} }}
'''
DECOUPLED_MODEL = '''
name: "llm"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_GPU count: 1 } ]
'''


def make_gpu_repo(root: Path) -> Path:
    """A torch and an onnx model over GPUs 0 and 1, and a decoupled text-generation model."""
    models = {}
    for name, runner, config in (("enc_torch", "torch", GPU_MODEL), ("enc_onnx", "onnx", GPU_MODEL),
                                 ("llm", None, DECOUPLED_MODEL)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(config.format(name=name, runner=runner) if runner else config)
        (root / name / "1" / "model.py").write_text("import json\n\nimport numpy as np\n")
        models[name] = {"role": "variant", "model": name, "task": "text-generation" if runner is None else "feature-extraction",
                        "status": "passed"}
    (root / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "runtime": "python", "models": models}))
    return root


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def deployed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"deploy-{request.param}")
    if request.param == "cpu":
        repo = make_toy_repo(root / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 0.5, 1.0)})
    else:
        repo = make_gpu_repo(root / "repo")
    out = root / "out"
    result = CliRunner().invoke(app, ["deploy", str(repo), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return request.param, repo, out


def test_dockerfile_is_clean_under_hadolint(deployed):
    _, _, out = deployed
    report = run([tool("hadolint"), "--failure-threshold", "info", "--format", "json", out / "Dockerfile"])
    assert json.loads(report) == []  # not even an info-level finding


def test_compose_file_matches_the_compose_specification(deployed):
    import jsonschema

    kind, repo, out = deployed
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"{COMPOSE_SCHEMA} is missing (make setup fetches it)")
    compose = yaml.safe_load((out / "compose.yaml").read_text())
    jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).validate(compose)
    triton = compose["services"]["triton"]
    # the build context and Dockerfile, relative to DIR, point at the repository and this Dockerfile
    assert (out / triton["build"]["context"]).resolve() == repo.resolve()
    assert (repo / triton["build"]["dockerfile"]).resolve() == (out / "Dockerfile").resolve()
    devices = triton.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    if kind == "gpu":
        assert devices == [{"driver": "nvidia", "count": 2, "capabilities": ["gpu"]}]
    else:
        assert devices is None
    for volume in compose["services"]["grafana"]["volumes"] + compose["services"]["prometheus"]["volumes"]:
        assert (out / volume.split(":")[0]).is_dir()


def test_prometheus_config_and_rule_unit_tests_pass_promtool(deployed):
    _, _, out = deployed
    promtool = tool("promtool")
    assert "SUCCESS" in run([promtool, "check", "config", out / "prometheus" / "prometheus.yml"])
    assert "SUCCESS" in run([promtool, "test", "rules", "rules_test.yml"], cwd=out / "prometheus")


def failed_rule_tests(prometheus: Path, tmp_path: Path, rules: str, tests: str, right: str, wrong: str) -> str:
    """A copy of `prometheus` with `right` replaced by `wrong` once in `rules`; `promtool test rules tests` must
    fail on it: its output."""
    shutil.copytree(prometheus, tmp_path / "p")
    path = tmp_path / "p" / rules
    text = path.read_text()
    assert right in text
    path.write_text(text.replace(right, wrong, 1))
    proc = subprocess.run([tool("promtool"), "test", "rules", tests], cwd=tmp_path / "p", capture_output=True, text=True)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_rule_unit_tests_catch_a_wrong_rule(deployed, tmp_path):
    """The promtool tests are not vacuous: queue time per inference instead of per request fails them."""
    _, _, out = deployed
    output = failed_rule_tests(out / "prometheus", tmp_path, "rules.yml", "rules_test.yml",
                               "sum by (model) (rate(nv_inference_queue_duration_us[1m])) / sum by (model) "
                               "(rate(nv_inference_request_success[1m]))",
                               "sum by (model) (rate(nv_inference_queue_duration_us[1m])) / sum by (model) "
                               "(rate(nv_inference_count[1m]))")
    assert "model:nv_inference_queue_us_per_request:rate" in output


def _kustomize(out: Path, overlay: str) -> list[dict]:
    text = run([tool("kubectl"), "kustomize", out / "kubernetes" / overlay])
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.mark.parametrize("overlay", ["base", "overlays/example"])
def test_kustomize_output_validates_strictly(deployed, overlay, tmp_path):
    kind, _, out = deployed
    docs = _kustomize(out, overlay)
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert kinds == {("apps/v1", "Deployment"), ("v1", "Service"), ("monitoring.coreos.com/v1", "PodMonitor"),
                     ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget")}
    validate = tool("kubernetes-validate")
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            continue  # a CRD: not in kubernetes-validate's schemas; checked by test_custom_resources_structure
        path = tmp_path / f"{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        report = run([validate, "--strict", path])
        assert "passed" in report and "WARN" not in report, report
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (2 if kind == "gpu" else None)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for doc in docs:  # every selector selects the Deployment's pods
        selector = doc["spec"].get("selector")
        if selector is not None:
            assert (selector.get("matchLabels") or selector).items() <= labels.items(), doc["kind"]
    hpa = next(d for d in docs if d["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_us_per_request"
    adapter = yaml.safe_load((out / "kubernetes" / "prometheus-adapter-values.yaml").read_text())
    assert adapter["rules"]["custom"][0]["name"]["as"] == "triton_queue_us_per_request"
    if overlay == "overlays/example":
        assert container["image"].startswith("registry.example.com/") and deployment["metadata"]["namespace"] == "triton"


# Structural schemas of the custom resources (their CRDs are not in kubernetes-validate): the fields
# this project writes, with their types, and nothing unknown at the levels it fills.
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _META, "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}}}}}}}},
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _META, "spec": {
            "type": "object", "additionalProperties": False, "required": ["supportedModelFormats", "containers"],
            "properties": {
                "supportedModelFormats": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                                     "additionalProperties": False, "properties": {
                    "name": {"type": "string"}, "version": {"type": "string"}, "autoSelect": {"type": "boolean"}}}},
                "protocolVersions": {"type": "array", "items": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
                "containers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "image"],
                    "properties": {"name": {"const": "kserve-container"}, "image": {"type": "string"},
                                   "args": {"type": "array", "items": {"type": "string"}}}}}}}}},
    ("serving.kserve.io/v1beta1", "InferenceService"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"metadata": _META, "spec": {
            "type": "object", "additionalProperties": False, "required": ["predictor"],
            "properties": {"predictor": {
                "type": "object", "additionalProperties": False, "required": ["model"],
                "properties": {
                    "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 1},
                    "model": {"type": "object", "additionalProperties": False,
                              "required": ["modelFormat", "storageUri"],
                              "properties": {"modelFormat": {"type": "object", "required": ["name"],
                                                             "properties": {"name": {"const": "triton"}}},
                                             "runtime": {"type": "string"},
                                             "storageUri": {"type": "string", "pattern": "^[a-z0-9]+://"}}}}}}}}},
}


def test_custom_resources_structure(deployed):
    import jsonschema

    _, _, out = deployed
    docs = [d for d in _kustomize(out, "base") if d["kind"] == "PodMonitor"]
    for path in sorted((out / "kserve").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert {(d["apiVersion"], d["kind"]) for d in docs} == set(CRD_SCHEMAS)
    for doc in docs:
        jsonschema.validate(doc, CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])])
    runtime = next(d for d in docs if d["kind"] == "ServingRuntime")
    service = next(d for d in docs if d["kind"] == "InferenceService")
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]


def test_dashboard_reads_recording_rules_that_exist(deployed):
    _, _, out = deployed
    rules = yaml.safe_load((out / "prometheus" / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    dashboard = json.loads((out / "grafana" / "dashboards" / "triton.json").read_text())
    used = {t["expr"].split("{")[0] for p in dashboard["panels"] for t in p["targets"]}
    assert {u for u in used if u.startswith("model:")} == recorded
    assert {"nv_gpu_utilization", "nv_gpu_memory_used_bytes"} <= used
    source = yaml.safe_load((out / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]


def test_what_the_image_installs(deployed):
    kind, _, out = deployed
    text = (out / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:26.07-py3\n" in text  # builder.deploy.ngc.DEFAULT_TAG
    installs = text.split("RUN pip install --no-cache-dir")[1].split("\n\n")[0].replace("\\", " ").split()
    # the 26.07 image: Python 3.12, and a python backend stub built with pybind11 2.12, so numpy 2
    assert "numpy 2: this image's python backend stub is built with pybind11 2.12" in text
    if kind == "cpu":  # the toy models import numpy only
        assert installs == ["numpy==2.4.6"]
    else:  # torch runner, onnx runner on GPU (so onnxruntime-gpu only), the decoupled LLM's torch+tokenizers+safetensors
        assert installs == ["numpy==2.4.6", "onnxruntime-gpu==1.27.0", "safetensors==0.8.0", "tokenizers==0.23.3",
                            "torch==2.13.0"]
        assert "llm" in (out / "README.md").read_text().split("decoupled (streaming): ")[1].split(")")[0]
    assert "USER 1000:1000" in text and "/v2/health/ready" in text and "EXPOSE 8000 8001 8002" in text


def test_tensorrt_engines_pin_their_image(tmp_path):
    from builder.deploy.facts import read_facts

    repo = make_toy_repo(tmp_path / "repo", {"toy_tensorrt_fp16": ("tensorrt", "fp16", 0.5, 1.0)})
    manifest = json.loads((repo / MANIFEST).read_text())
    manifest["models"]["toy_tensorrt_fp16"]["tensorrt"] = {"tensorrt": "10.3.0", "image": "nvcr.io/nvidia/tritonserver:24.08-py3"}
    (repo / MANIFEST).write_text(json.dumps(manifest))
    facts = read_facts(repo, "nvcr.io/nvidia/tritonserver:26.07-py3")
    assert facts.image == "nvcr.io/nvidia/tritonserver:24.08-py3"
    # that image's Python 3.10 and a stub built before NumPy 2 support: the pins follow the image
    assert (facts.python, facts.requirements) == ("3.10", ("numpy==1.26.4",))


BAD_DEPLOYS = {
    "no_manifest": (lambda repo, out: (repo / MANIFEST).unlink(), [],
                    "{repo}: no triton-builder.json here; build a repository with 'triton-builder build SPEC -o {repo}'"),
    "out_not_empty": (lambda repo, out: (out.mkdir(), (out / "x").write_text("")), [],
                      "{out}: exists and is not empty; choose another -o or pass --force to replace it"),
    "rate_window": (lambda repo, out: None, ["--rate-window", "30s"],
                    "--rate-window 30s: give at least 4 scrape intervals (4 x 15s), or rate() has too few samples"),
    "duration": (lambda repo, out: None, ["--scrape-interval", "fast"],
                 "--scrape-interval 'fast': give a duration like 15s, 1m or 1h"),
    "replicas": (lambda repo, out: None, ["--min-replicas", "3", "--max-replicas", "2"],
                 "--min-replicas 3 / --max-replicas 2: need 1 <= min <= max"),
    "base_image": (lambda repo, out: None, ["--base-image", "ubuntu:22.04"],
                   "--base-image 'ubuntu:22.04': give an NGC Triton image such as nvcr.io/nvidia/tritonserver:26.07-py3"),
    "base_image_tag": (lambda repo, out: None, ["--base-image", "nvcr.io/nvidia/tritonserver:23.05-py3"],
                       "--base-image 'nvcr.io/nvidia/tritonserver:23.05-py3': tag 23.05 is not in the NGC release "
                       "table (builder/deploy/ngc.py: 24.08 to 26.07); choose one of those"),
    "target": (lambda repo, out: None, ["--target", "helm"],
               "--target helm: choose from compose, kubernetes, kserve, dynamo, kserve-llm"),
    "kserve_llm_without_llm": (lambda repo, out: None, ["--target", "kserve-llm"],
                               "--target kserve-llm: the repository has no LLM (a text-generation model); use --target kserve"),
}


@pytest.mark.parametrize("case", sorted(BAD_DEPLOYS))
def test_bad_deploy_exits_2_with_one_line_and_writes_nothing(case, tmp_path):
    prepare, args, expected = BAD_DEPLOYS[case]
    repo = make_toy_repo(tmp_path / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 0.5, 1.0)})
    out = tmp_path / "out"
    prepare(repo, out)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["deploy", str(repo), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == ["error: " + expected.format(repo=repo, out=out)]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no staging left


def test_force_replaces_and_readme_lists_every_file(tmp_path):
    repo = make_toy_repo(tmp_path / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 0.5, 1.0)})
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale").write_text("")
    result = CliRunner().invoke(app, ["deploy", str(repo), "-o", str(out), "--force", "--name", "embed"])
    assert result.exit_code == 0, result.output
    assert not (out / "stale").exists()
    readme = (out / "README.md").read_text()
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "README.md"]
    for f in files:  # every file is explained (its directory or its name appears)
        assert f.name in readme or f"{f.parent}" in readme or f"{f.parts[0]}/" in readme, f
    assert "targets: [\"embed:8002\"]" in (out / "prometheus" / "prometheus.yml").read_text()
