"""`triton-builder analyzer-files`: what NVIDIA's Model Analyzer needs to profile a built repository
with this machine's tritonserver (the one from nvidia-pytriton, or any on PATH).

OUT gets:
- backends/: a lasting copy of the backend directory `serve` assembles at each start (the python
  backend with the stub for the stub environment's Python);
- config.yaml: Model Analyzer's profile config: local launch of that tritonserver with
  `backend_directory`, the server environment (PATH, LD_LIBRARY_PATH), perf_analyzer's path and, per
  model, `cpu_only` and `input-data` (the repository's `<model>/perf_input.json`, valid requests made
  from the signature; perf_analyzer's random data is refused by the models' input checks);
- run.sh and README.md: the exact commands.

Model Analyzer option names as documented for 1.58 (docs/config.md of triton-inference-server/model_analyzer).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import yaml

from builder.errors import UserError
from builder.perf.inputs import PERF_INPUT
from builder.render import parse_config

CONFIG = "config.yaml"
RUN = "run.sh"
README = "README.md"
MA_VERSION = "1.58.0"


def profiled_models(repo: Path, manifest: dict, names: list[str] | None) -> list[str]:
    """Passed variants with a config and perf input data; or exactly those named (checked)."""
    from builder.perf.tune import why_not

    entries = manifest["models"]
    if names:
        for name in names:
            if name not in entries:
                raise UserError(f"--model {name}: not in {repo}; have: {', '.join(sorted(entries))}")
            why = why_not(repo, name, entries[name])
            if why:
                raise UserError(f"--model {name}: {why}")
        chosen = list(dict.fromkeys(names))
    else:
        chosen = sorted(n for n, e in entries.items() if why_not(repo, n, e) is None)
        if not chosen:
            raise UserError(f"{repo}: no passed variant to profile")
    missing = [n for n in chosen if not (repo / n / PERF_INPUT).is_file()]
    if missing:
        raise UserError(f"{repo}: {', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} no {PERF_INPUT} "
                        f"(written by 'triton-builder build' since this version); rebuild the repository")
    return chosen


def analyzer_config(repo: Path, out: Path, models: list[str], *, tritonserver: Path, backends: Path | None,
                    environment: dict[str, str], perf_analyzer: Path, concurrency: list[int] | None,
                    max_instances: int, latency_budget_ms: float | None) -> dict:
    """Model Analyzer's profile config as data."""
    repo, out = Path(repo).resolve(), Path(out).resolve()
    configs = {n: parse_config((repo / n / "config.pbtxt").read_text(), f"{n}/config.pbtxt") for n in models}
    profile = {}
    for name in models:
        item = {"cpu_only": all(g.kind != g.KIND_GPU for g in configs[name].instance_group),
                "perf_analyzer_flags": {"input-data": str(repo / name / PERF_INPUT)}}
        if concurrency:
            item["parameters"] = {"concurrency": list(concurrency)}
        profile[name] = item
    batching = [c for c in configs.values() if c.max_batch_size > 0]
    config = {
        "model_repository": str(repo),
        "profile_models": profile,
        "triton_launch_mode": "local",
        "triton_server_path": str(tritonserver),
        "triton_server_flags": {"exit_timeout_secs": 10, "strict_readiness": True,
                                **({"backend_directory": str(backends)} if backends else {})},
        "triton_server_environment": environment,
        "triton_output_path": str(out / "tritonserver.log"),
        "perf_analyzer_path": str(perf_analyzer),
        "perf_output": True,
        "perf_output_path": str(out / "perf_analyzer.log"),
        "output_model_repository_path": str(out / "output_model_repository"),
        "override_output_model_repository": True,
        "checkpoint_directory": str(out / "checkpoints"),
        "export_path": str(out / "results"),
        "run_config_search_max_instance_count": max_instances,
        "run_config_search_max_concurrency": max(concurrency) if concurrency else 16,
    }
    if batching:
        config["run_config_search_max_model_batch_size"] = max(c.max_batch_size for c in batching)
        # a model whose config keeps preferred_batch_size: a smaller max_batch_size would be illegal
        floor = max((max(c.dynamic_batching.preferred_batch_size, default=1) for c in batching), default=1)
        if floor > 1:
            config["run_config_search_min_model_batch_size"] = floor
    if latency_budget_ms:
        config["latency_budget"] = int(latency_budget_ms)
    return config


def write_analyzer_files(repo: Path, out: Path, *, models: list[str] | None = None, tritonserver: Path | None = None,
                         stub_python: Path | None = None, concurrency: list[int] | None = None,
                         max_instances: int | None = None, latency_budget_ms: float | None = 50.0,
                         force: bool = False) -> list[Path]:
    """Write backends/, config.yaml, run.sh and README.md into `out`; return the files written."""
    from builder.manifest import read_manifest
    from builder.perf.analyzer import cuda_runtime_lib_dir, find_perf_analyzer
    from builder.runtime.local import lasting_backends
    from builder.validate import validate_repository

    repo, out = Path(repo), Path(out)
    manifest = read_manifest(repo)
    validate_repository(repo)
    chosen = profiled_models(repo, manifest, models)
    if concurrency is not None and (not concurrency or min(concurrency) < 1):
        raise UserError(f"--concurrency {concurrency}: give integers >= 1, e.g. 4,16")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty; choose another -o directory or pass --force")
    perf_analyzer = find_perf_analyzer()
    out.mkdir(parents=True, exist_ok=True)
    server, backends, environment = lasting_backends(out.resolve(), tritonserver=tritonserver, stub_python=stub_python)
    config = analyzer_config(repo, out, chosen, tritonserver=server, backends=backends, environment=environment,
                             perf_analyzer=perf_analyzer, concurrency=concurrency,
                             max_instances=max_instances or max(2, os.cpu_count() or 1),
                             latency_budget_ms=latency_budget_ms)
    (out / CONFIG).write_text("# Model Analyzer profile config, written by triton-builder analyzer-files\n"
                              + yaml.safe_dump(config, sort_keys=False))
    cuda = cuda_runtime_lib_dir()
    run = out / RUN
    run.write_text("#!/bin/sh\n"
                   "# Profile the repository with Model Analyzer (its own venv: MA=/path/to/ma-venv ./run.sh)\n"
                   "set -e\n"
                   'MA="${MA:-/tmp/ma-venv}"\n'
                   + (f"export LD_LIBRARY_PATH={shlex.quote(str(cuda))}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
                      "  # perf_analyzer links libcudart.so.12\n" if cuda else "")
                   + f'exec "$MA/bin/model-analyzer" profile -f {shlex.quote(str((out / CONFIG).resolve()))} "$@"\n')
    run.chmod(0o755)
    (out / README).write_text(readme(repo, out, chosen, config))
    return [out / CONFIG, run, out / README, backends]


def readme(repo: Path, out: Path, models: list[str], config: dict) -> str:
    quoted = shlex.quote(str(out))
    first = models[0]
    return f"""# Model Analyzer on {repo}

Written by `{shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`. Model Analyzer {MA_VERSION} pulls numpy 2,
which breaks the python backend's stub: keep it in its own virtual environment, never in the one the
server's stub uses.

```bash
python3 -m venv /tmp/ma-venv
/tmp/ma-venv/bin/pip install triton-model-analyzer=={MA_VERSION}
MA=/tmp/ma-venv {quoted}/run.sh          # = model-analyzer profile -f {quoted}/config.yaml
```

What `config.yaml` sets, and why:
- `triton_launch_mode: local` with `triton_server_path` {config['triton_server_path']}
  and `triton_server_flags.backend_directory` {config['triton_server_flags'].get('backend_directory', '(its own)')}:
  the python backend and the stub for this Python, which Model Analyzer cannot find by itself in
  nvidia-pytriton's server.
- `triton_server_environment`: `PATH` with the stub environment's `bin/` first (the stub embeds the first
  `python3` on PATH; it needs numpy<2) and `LD_LIBRARY_PATH` with its libpython, the server's bundled
  libraries and the CUDA runtime wheel's `lib/`.
- per model `perf_analyzer_flags.input-data`: `<model>/{PERF_INPUT}` from the repository, requests
  made from each model's signature (ids inside the vocabulary, real shapes); perf_analyzer's own random
  data is refused by the models' input checks. `cpu_only` for models served on CPU instances.
- `run_config_search_max_model_batch_size` is the built max_batch_size (the artifacts were made for it).
  {"`run_config_search_min_model_batch_size` keeps Model Analyzer from configs whose max_batch_size would be below a preferred_batch_size still in a config." if 'run_config_search_min_model_batch_size' in config else ""}

Models: {', '.join(models)}. Results go to `{config['export_path']}`; the server's log to
`{config['triton_output_path']}`. The same search with triton-builder's own tool, for comparison:

```bash
triton-builder tune {shlex.quote(str(repo))} --model {first} --concurrency 4
```
"""
