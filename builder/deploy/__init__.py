"""`triton-builder deploy REPO -o DIR`: everything needed to run a built repository in production.

    deploy(Path("model_repository"), Path("deploy"))          # writes DIR, returns the list of files

DIR gets a Dockerfile (NGC Triton + the pinned packages the python models need), compose.yaml
(Triton, Prometheus, Grafana), Prometheus scrape config, recording and alert rules with their promtool
unit tests, a Grafana datasource and dashboard, a kustomize base and example overlay (Deployment,
Service, PodMonitor, HPA on queue time per request, PodDisruptionBudget, the prometheus-adapter rule),
a KServe InferenceService, and a README. Every file comes from templates/deploy/ (Jinja,
StrictUndefined) except the dashboard, which is data written as JSON. DIR is written whole or not at
all: files are staged beside it and moved into place at the end.
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


@dataclass(frozen=True)
class DeployOptions:
    """The knobs of `deploy` (the CLI options of the same names); each is explained in DIR/README.md."""

    base_image: str | None = None  # NGC Triton image; default builder.runtime.DEFAULT_IMAGE (or the TensorRT one)
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
    storage_uri: str = "pvc://triton-models/model_repository"  # KServe: where the repository is stored

    def __post_init__(self) -> None:
        for knob in ("scrape_interval", "rate_window"):
            if not DURATION.match(getattr(self, knob)):
                raise UserError(f"--{knob.replace('_', '-')} {getattr(self, knob)!r}: give a duration like 15s, 1m or 1h")
        if _seconds(self.rate_window) < 4 * _seconds(self.scrape_interval):
            raise UserError(f"--rate-window {self.rate_window}: give at least 4 scrape intervals "
                            f"(4 x {self.scrape_interval}), or rate() has too few samples")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", self.name):
            raise UserError(f"--name {self.name!r}: use lower-case letters, digits and '-' (a Kubernetes name)")
        if self.metrics_target is not None and not re.fullmatch(r"[\w.-]+:\d+", self.metrics_target):
            raise UserError(f"--metrics-target {self.metrics_target!r}: give host:port, e.g. triton:8002")
        for knob in ("latency_budget_ms", "failure_ratio", "queue_target_ms"):
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


def _humanize(value: float) -> str:
    """Prometheus' `humanize` of a value between 1e-3 and 1e3 (the alert text the rules test expects)."""
    return f"{value * 1e3:.4g}m" if value < 1 else f"{value:.4g}"


def image_name(repo: Path) -> str:
    base = re.sub(r"[^a-z0-9._-]+", "-", Path(repo).resolve().name.lower()).strip("-._") or "repository"
    return f"triton-builder/{base}:latest"


def deploy(repo: Path, out: Path, options: DeployOptions = DeployOptions(), force: bool = False) -> list[Path]:
    """Write the deployment files for `repo` into `out`; return their paths (relative to `out`)."""
    from builder.deploy.facts import IMAGE_PYTHON, read_facts
    from builder.deploy.grafana import dashboard
    from builder.render import environment
    from builder.runtime.server import DEFAULT_IMAGE

    repo, out = Path(repo), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise UserError(f"{out}: exists and is not empty; choose another -o or pass --force to replace it")
    if out.resolve() == repo.resolve() or out.resolve().is_relative_to(repo.resolve()):
        raise UserError(f"-o {out}: must be outside the repository {repo} (Triton would see it as a model)")
    facts = read_facts(repo, options.base_image or DEFAULT_IMAGE)
    values = dict(
        facts=facts, o=options, ports=PORTS, image=options.image or image_name(repo),
        repo_name=repo.resolve().name,
        # compose builds with the repository as context and this Dockerfile, both relative to DIR
        context=os.path.relpath(repo.resolve(), out.resolve().parent / out.name),
        dockerfile=os.path.relpath((out.resolve() / "Dockerfile"), repo.resolve()),
        metrics_target=options.metrics_target or f"{options.name}:{PORTS['metrics']}", python=IMAGE_PYTHON,
        t=rules_test_timeline(options.rate_window), humanized_double_budget=_humanize(2 * options.latency_budget_ms / 1000),
        latency_budget_us=int(options.latency_budget_ms * 1000), queue_target_us=int(options.queue_target_ms * 1000),
        test_model=next((m.name for m in facts.models if m.backend != "ensemble"), facts.models[0].name),
    )
    env = environment()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    written = []
    try:
        for template in sorted(TEMPLATES.rglob("*.j2")):
            rel = template.relative_to(TEMPLATES).with_suffix("")
            text = env.get_template(f"deploy/{rel}.j2").render(**values)
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_text(text)
            written.append(rel)
        rel = Path("grafana/dashboards/triton.json")
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        import json

        (stage / rel).write_text(json.dumps(dashboard(options.rate_window), indent=1) + "\n")
        written.append(rel)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage)
    return sorted(written)
