"""`triton-builder deploy REPO -o DIR`: everything needed to run a built repository in production.

    deploy(Path("model_repository"), Path("deploy"))          # writes DIR, returns the list of files

DIR gets, whatever the targets: a Dockerfile (NGC Triton + the pinned packages the python models need),
Prometheus scrape config, recording and alert rules with their promtool unit tests, Grafana provisioning
and dashboards, and a README. Then per target (`--target`, repeatable; default all that apply):
compose (compose.yaml: Triton, Prometheus, Grafana), kubernetes (a kustomize base and example overlay:
Deployment, Service, PodMonitor, HPA on queue time per request, PodDisruptionBudget, the
prometheus-adapter rule), kserve (a ServingRuntime and InferenceService), dynamo (a DynamoGraphDeployment,
builder/deploy/dynamo.py) and kserve-llm (an LLMInferenceService, builder/deploy/kserve_llm.py); the last
two, the LLM dashboard and the LLM rules only for a repository with an LLM (builder/deploy/llm.py).
Files come from templates/deploy/ (Jinja, StrictUndefined), except the dashboards and the custom
resources, which are data written as JSON / YAML. DIR is written whole or not at all: files are staged
beside it and moved into place at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.errors import UserError

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates" / "deploy"
DURATION = re.compile(r"^[1-9]\d*[smh]$")
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
TARGETS = ("compose", "kubernetes", "kserve", "dynamo", "kserve-llm")
LLM_TARGETS = ("dynamo", "kserve-llm")


@dataclass(frozen=True)
class DeployOptions:
    """The knobs of `deploy` (the CLI options of the same names); each is explained in DIR/README.md."""

    base_image: str | None = None  # NGC Triton image; default builder.deploy.ngc.DEFAULT_IMAGE (or the TensorRT one)
    image: str | None = None  # the image to build; default triton-builder/<repo dir>:latest
    name: str = "triton"  # Kubernetes name / label, compose service
    metrics_target: str | None = None  # what Prometheus scrapes; default the compose service, <name>:8002
    scrape_interval: str = "15s"
    rate_window: str = "1m"  # window of the recording rules' rate()
    latency_budget_ms: float = 100.0  # alert: average queue time per request above it
    failure_ratio: float = 0.01  # alert: failed / all requests above it
    queue_target_ms: float = 10.0  # HPA: add replicas while average queue time per request is above it
    min_replicas: int = 1
    max_replicas: int = 4
    storage_uri: str = "pvc://triton-models/model_repository"  # KServe, Dynamo: where the repository is stored
    targets: tuple[str, ...] = ()  # of TARGETS; empty: every one that applies to the repository
    disaggregated: bool = False  # dynamo / kserve-llm: separate prefill and decode workers
    ttft_budget_ms: float = 2000.0  # LLM alert: p95 time to first token above it
    llm_metrics_target: str | None = None  # what Prometheus scrapes for LLM metrics; default <name>:9000

    def __post_init__(self) -> None:
        for knob in ("scrape_interval", "rate_window"):
            if not DURATION.match(getattr(self, knob)):
                raise UserError(f"--{knob.replace('_', '-')} {getattr(self, knob)!r}: give a duration like 15s, 1m or 1h")
        if _seconds(self.rate_window) < 4 * _seconds(self.scrape_interval):
            raise UserError(f"--rate-window {self.rate_window}: give at least 4 scrape intervals "
                            f"(4 x {self.scrape_interval}), or rate() has too few samples")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", self.name):
            raise UserError(f"--name {self.name!r}: use lower-case letters, digits and '-' (a Kubernetes name)")
        for knob, example in (("metrics_target", "triton:8002"), ("llm_metrics_target", "triton:9000")):
            value = getattr(self, knob)
            if value is not None and not re.fullmatch(r"[\w.-]+:\d+", value):
                raise UserError(f"--{knob.replace('_', '-')} {value!r}: give host:port, e.g. {example}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise UserError(f"--target {unknown[0]}: choose from {', '.join(TARGETS)}")
        for knob in ("latency_budget_ms", "failure_ratio", "queue_target_ms", "ttft_budget_ms"):
            if not getattr(self, knob) > 0:
                raise UserError(f"--{knob.replace('_', '-')}: must be above 0")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise UserError(f"--min-replicas {self.min_replicas} / --max-replicas {self.max_replicas}: "
                            "need 1 <= min <= max")


def _seconds(duration: str) -> int:
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


def rules_test_timeline(rate_window: str) -> dict:
    """Times (s) of prometheus/rules_test.yml: a sample every quarter window; healthy until `fail_from`,
    failures firing (for: 5m) at `fail_fires`, the target down at `down_from`, firing (for: 1m) at `down_fires`."""
    w = _seconds(rate_window)
    step = max(w // 4, 1)
    t = dict(step=step, check=2 * w, fail_from=3 * w)
    t["fail_fires"] = t["fail_from"] + w + 300 + 2 * step
    t["down_from"] = t["fail_fires"] + step
    t["down_fires"] = t["down_from"] + 60 + 2 * step
    t.update(fail_from_i=t["fail_from"] // step, down_from_i=t["down_from"] // step, n=t["down_fires"] // step + 4)
    return t


def llm_rules_test_values(ttft_budget_s: float, queue_budget_s: float) -> dict:
    """The made-up histograms of prometheus/llm_rules_test.yml (cumulative requests per bucket per sample,
    10 a sample) and the values the rules must give: one model within the budgets, "slow" above them.
    The slow model's requests all fall past the last finite bucket, where histogram_quantile answers that
    bucket's bound exactly, so the alert text (humanizeDuration of it) is exact too."""
    T, Q = ttft_budget_s, queue_budget_s

    def buckets(edges, from_index):
        return [(f"{e:g}", 10 if i >= from_index else 0) for i, e in enumerate(edges)] + [("+Inf", 10)]

    ttft_edges, queue_edges = (T / 2, 2 * T, 4 * T), (Q / 2, 2 * Q, 4 * Q)
    top_t, top_q = float(f"{4 * T:g}"), float(f"{4 * Q:g}")  # the bounds as Prometheus parses the le labels
    # inside a bucket histogram_quantile interpolates linearly (from 0 in the first)
    fast = {"ttft_p50": 0.5 * float(f"{T / 2:g}"), "ttft_p95": 0.95 * float(f"{T / 2:g}"), "itl_p50": 0.025,
            "itl_p95": 0.0475, "queue_p95": 0.95 * float(f"{Q / 2:g}"), "queue_avg": 0.25 * Q, "generation_tps": 10,
            "prompt_tps": 5, "requests": 1, "running": 4, "waiting": 2, "kv_usage": 0.5, "prefix_hit_ratio": 0.25}
    slow = {"ttft_p95": top_t, "queue_p95": top_q, "queue_avg": 5 * Q}
    return dict(
        ttft_fast_buckets=buckets(ttft_edges, 0), ttft_slow_buckets=buckets(ttft_edges, 3),
        queue_fast_buckets=buckets(queue_edges, 0), queue_slow_buckets=buckets(queue_edges, 3),
        itl_buckets=[("0.05", 10), ("+Inf", 10)], itl_le=0.05, ttft_fast_le=f"{T / 2:g}", ttft_slow_lo=f"{4 * T:g}",
        queue_fast_le=f"{Q / 2:g}", queue_slow_lo=f"{4 * Q:g}", queue_sum_fast=repr(2.5 * Q), queue_sum_slow=repr(50 * Q),
        expected=[(k, "{model}", repr(float(v))) for k, v in fast.items()] + [(k, "slow", repr(float(v))) for k, v in slow.items()],
        ttft_slow_p95_text=_humanize_duration(top_t), queue_slow_p95_text=_humanize_duration(top_q),
    )


def _humanize_duration(v: float) -> str:
    """Prometheus' `humanizeDuration` (the alert text the LLM rules test expects)."""
    if v == 0:
        return "0s"
    if v < 1:
        prefix = ""
        for p in ("m", "u", "n", "p"):
            if v >= 1:
                break
            prefix, v = p, v * 1000
        return f"{v:.4g}{prefix}s"
    seconds = int(v)
    d, h, m, s = seconds // 86400, seconds // 3600 % 24, seconds // 60 % 60, seconds % 60
    if d:
        return f"{d}d {h}h {m}m {s}s"
    if h:
        return f"{h}h {m}m {s}s"
    if m:
        return f"{m}m {s}s"
    return f"{v:.4g}s"


def _humanize(value: float) -> str:
    """Prometheus' `humanize` of a value between 1e-3 and 1e3 (the alert text the rules test expects)."""
    return f"{value * 1e3:.4g}m" if value < 1 else f"{value:.4g}"


def image_name(repo: Path) -> str:
    base = re.sub(r"[^a-z0-9._-]+", "-", Path(repo).resolve().name.lower()).strip("-._") or "repository"
    return f"triton-builder/{base}:latest"


def _choose(options: DeployOptions, llms: list) -> tuple[set[str], dict[str, str]]:
    """The targets to write, and why an LLM target was left out by default."""
    if options.targets:
        return set(options.targets), {}
    chosen, skipped = {"compose", "kubernetes", "kserve"}, {}
    if llms:
        engines = {m.engine for m in llms}
        names = ", ".join(f"{m.name} ({m.engine})" for m in llms)
        if len(engines) > 1 or (len(llms) > 1 and engines != {"triton"}):
            skipped["dynamo"] = (f"one LLM engine and one vLLM / TensorRT-LLM model per graph, and this repository "
                                 f"has {names}: deploy a repository per model")
        else:
            chosen.add("dynamo")
        if engines == {"vllm"} and len(llms) == 1:
            chosen.add("kserve-llm")
        else:
            skipped["kserve-llm"] = ("KServe's LLMInferenceService runs one vLLM (llm-d) model, and this repository "
                                     f"has {names}: add a format: vllm variant to the spec, or deploy it alone")
    return chosen, skipped


def _wanted(rel: Path, targets: set[str], has_llm: bool, dynamo_triton: bool) -> bool:
    top = rel.parts[0]
    if top in TARGETS:
        return top in targets and (top != "dynamo" or dynamo_triton)  # dynamo/Dockerfile: the Triton worker's image
    if rel == Path("compose.yaml"):
        return "compose" in targets
    if rel.name.startswith("llm"):
        return has_llm
    return True


def _served_models(repo: Path, facts) -> list[tuple[str, int]]:
    """(model, GPUs) a client calls: every model that is not a step of an ensemble in the repository."""
    from builder.render import parse_config

    steps = set()
    for m in facts.models:
        if m.backend == "ensemble":
            config = parse_config((repo / m.name / "config.pbtxt").read_text(), m.name)
            steps |= {s.model_name for s in config.ensemble_scheduling.step}
    return [(m.name, m.gpus) for m in facts.models if m.name not in steps]


def deploy(repo: Path, out: Path, options: DeployOptions = DeployOptions(), force: bool = False) -> list[Path]:
    """Write the deployment files for `repo` into `out`; return their paths (relative to `out`)."""
    import json

    import yaml

    from builder.deploy import dynamo, kserve_llm, llm_metrics, ngc
    from builder.deploy.facts import read_facts
    from builder.deploy.grafana import dashboard, llm_dashboard
    from builder.deploy.llm import find_llms
    from builder.render import environment

    repo, out = Path(repo), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise UserError(f"{out}: exists and is not empty; choose another -o or pass --force to replace it")
    if out.resolve() == repo.resolve() or out.resolve().is_relative_to(repo.resolve()):
        raise UserError(f"-o {out}: must be outside the repository {repo} (Triton would see it as a model)")
    facts = read_facts(repo, options.base_image or ngc.DEFAULT_IMAGE)
    llms = find_llms(repo)
    targets, skipped = _choose(options, llms)
    if options.disaggregated and not targets & set(LLM_TARGETS):
        raise UserError("--disaggregated: applies to --target dynamo or kserve-llm only")
    dynamo_triton = "dynamo" in targets and (not llms or llms[0].engine == "triton")
    image = options.image or image_name(repo)
    docs: dict[Path, str] = {}  # custom resources and dashboards, written as data
    if "dynamo" in targets:
        graph = dynamo.graph(llms, name=options.name, triton_models=_served_models(repo, facts),
                             triton_image=dynamo_image(image), disaggregated=options.disaggregated,
                             storage_uri=options.storage_uri)
        docs[Path("dynamo/graph.yaml")] = yaml.safe_dump_all(graph, sort_keys=False, width=120)
    if "kserve-llm" in targets:
        isvc = kserve_llm.service(llms, name=options.name, storage_uri=options.storage_uri,
                                  disaggregated=options.disaggregated, min_replicas=options.min_replicas)
        docs[Path("kserve-llm/llminferenceservice.yaml")] = yaml.safe_dump(isvc, sort_keys=False, width=1000)
    docs[Path("grafana/dashboards/triton.json")] = json.dumps(dashboard(options.rate_window), indent=1) + "\n"
    if llms:
        docs[Path("grafana/dashboards/llm.json")] = json.dumps(llm_dashboard(options.rate_window), indent=1) + "\n"
    values = dict(
        facts=facts, o=options, ports=PORTS, image=image, repo_name=repo.resolve().name,
        # compose builds with the repository as context and this Dockerfile, both relative to DIR
        context=os.path.relpath(repo.resolve(), out.resolve().parent / out.name),
        dockerfile=os.path.relpath((out.resolve() / "Dockerfile"), repo.resolve()),
        dynamo_dockerfile=os.path.relpath((out.resolve() / "dynamo" / "Dockerfile"), repo.resolve()),
        metrics_target=options.metrics_target or f"{options.name}:{PORTS['metrics']}", python=facts.python,
        t=rules_test_timeline(options.rate_window), humanized_double_budget=_humanize(2 * options.latency_budget_ms / 1000),
        latency_budget_us=int(options.latency_budget_ms * 1000), queue_target_us=int(options.queue_target_ms * 1000),
        test_model=next((m.name for m in facts.models if m.backend != "ensemble"), facts.models[0].name),
        targets=targets, skipped=skipped, llms=llms, llm=llm_metrics, dynamo=dynamo, dynamo_image=dynamo_image(image),
        dynamo_base=dynamo.RUNTIME_IMAGES["vllm"], worker_url=dynamo.TRITON_WORKER_URL,
        tritonclient=ngc.release_of(facts.image).triton,
        llm_metrics_target=options.llm_metrics_target or f"{options.name}:{llm_metrics.PORT}",
        ttft_budget_s=options.ttft_budget_ms / 1000, queue_budget_s=options.latency_budget_ms / 1000,
        llm_test_model=llms[0].name if llms else "",
        h=_llm_test_values(options, llms), ngc_release=ngc.release_of(facts.image),
    )
    env = environment()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    written = []
    try:
        for template in sorted(TEMPLATES.rglob("*.j2")):
            rel = template.relative_to(TEMPLATES).with_suffix("")
            if not _wanted(rel, targets, bool(llms), dynamo_triton):
                continue
            text = env.get_template(f"deploy/{rel}.j2").render(**values)
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
            written.append(rel)
        for rel, text in docs.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
            written.append(rel)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return sorted(written)


def _llm_test_values(options: DeployOptions, llms: list) -> dict:
    h = llm_rules_test_values(options.ttft_budget_ms / 1000, options.latency_budget_ms / 1000)
    model = llms[0].name if llms else ""
    h["expected"] = [(k, m.format(model=model), v) for k, m, v in h["expected"]]
    return h


def dynamo_image(image: str) -> str:
    """The Dynamo-Triton worker image's name, beside the Triton image's."""
    name, _, tag = image.rpartition(":")
    return f"{name}-dynamo:{tag}" if name and "/" not in tag else f"{image}-dynamo"
