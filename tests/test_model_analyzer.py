"""`analyzer-files`: the files Model Analyzer needs are complete: a tritonserver started from them alone
(as Model Analyzer's local launch mode starts it) finds the python backend and its stub and serves the
model, and perf_analyzer with the written input data gets answers. No Model Analyzer install here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from builder.cli import app
from builder.perf.inputs import PERF_INPUT, write_input_data
from test_perf_server import SIGNATURE, make_toy_repo

NAME = "toy_onnx_int8"


def toy_repo(root: Path) -> Path:
    repo = make_toy_repo(root, {NAME: ("onnx", "int8", 0.5, 0.999)})
    write_input_data(SIGNATURE, repo / NAME / PERF_INPUT)  # what `build` writes beside every model
    return repo


@pytest.mark.server
def test_server_starts_from_the_written_files_alone(tmp_path):
    from builder.perf.analyzer import PerfFlags, run_once
    from builder.runtime.local import stop_process
    from builder.runtime.ports import resolve_ports, url
    from builder.runtime.server import read_tail, wait_ready

    repo = toy_repo(tmp_path / "repo")
    out = tmp_path / "ma"
    result = CliRunner().invoke(app, ["analyzer-files", str(repo), "-o", str(out), "--concurrency", "4"])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    model = config["profile_models"][NAME]
    assert model == {"cpu_only": True, "perf_analyzer_flags": {"input-data": str((repo / NAME / PERF_INPUT).resolve())},
                     "parameters": {"concurrency": [4]}}
    assert config["triton_launch_mode"] == "local" and config["model_repository"] == str(repo.resolve())
    assert config["run_config_search_max_model_batch_size"] == 8
    assert "run_config_search_min_model_batch_size" not in config  # the toy config has no preferred_batch_size
    run_sh = (out / "run.sh").read_text()
    assert f"profile -f {(out / 'config.yaml').resolve()}" in run_sh and os.access(out / "run.sh", os.X_OK)
    assert "pip install triton-model-analyzer==" in (out / "README.md").read_text()

    # Model Analyzer's local mode: its tritonserver, its flags, the environment's variables on a plain one
    flags = {k.replace("_", "-"): v for k, v in config["triton_server_flags"].items()}
    assert Path(flags["backend-directory"], "python", "triton_python_backend_stub").is_file()
    ports = resolve_ports("127.0.0.1", {"http": None, "grpc": None, "metrics": None})
    command = [config["triton_server_path"], f"--model-repository={config['model_repository']}",
               *(f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()),
               "--model-control-mode=explicit", f"--load-model={NAME}", "--http-address=127.0.0.1",
               f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}", f"--metrics-port={ports['metrics']}",
               "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
    env = {"HOME": str(tmp_path), **config["triton_server_environment"]}
    log = tmp_path / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(command, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        models = wait_ready(url("127.0.0.1", ports["http"]), exit_code=proc.poll, read_log=lambda: read_tail(log),
                            log_name=str(log), timeout=120)
        assert NAME in models
        flags_pa = PerfFlags(model=NAME, url=f"127.0.0.1:{ports['grpc']}", concurrency=(2, 2, 1), measurement_ms=500,
                             input_data=model["perf_analyzer_flags"]["input-data"])
        attempt = run_once(flags_pa, tmp_path / "pa", binary=Path(config["perf_analyzer_path"]),
                           env={"HOME": str(tmp_path), "LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"]})
        assert attempt.returncode == 0 and attempt.rows and attempt.rows[0]["throughput"] > 0, attempt.stderr_tail
    finally:
        stop_process(proc)


def test_bad_input_is_a_one_line_error(tmp_path):
    repo = make_toy_repo(tmp_path / "repo", {NAME: ("onnx", "int8", 0.5, 0.999)})
    for args, message in {
        (): f"{repo}: {NAME} has no {PERF_INPUT} (written by 'triton-builder build' since this version); rebuild the repository",
        ("--model", "nope"): "--model nope: not in",
        ("--concurrency", "0"): "--concurrency [0]: give integers >= 1, e.g. 4,16",
    }.items():
        if args:
            write_input_data(SIGNATURE, repo / NAME / PERF_INPUT)
        result = CliRunner().invoke(app, ["analyzer-files", str(repo), "-o", str(tmp_path / "ma"), *args])
        assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
    (tmp_path / "ma").mkdir()
    (tmp_path / "ma" / "keep").write_text("x")
    result = CliRunner().invoke(app, ["analyzer-files", str(repo), "-o", str(tmp_path / "ma")])
    assert result.exit_code == 2 and "exists and is not empty" in result.output


def test_validate_checks_the_perf_input_file(tmp_path):
    from builder.errors import UserError
    from builder.validate import validate_repository

    repo = toy_repo(tmp_path / "repo")
    assert validate_repository(repo) == 1
    (repo / NAME / PERF_INPUT).write_text('{"data": [{"input_ids": {"content": [1], "shape": [1]}}]}')
    with pytest.raises(UserError, match=rf"{NAME}/{PERF_INPUT}: request 0 names \['input_ids'\], the config's inputs "
                                        r"are \['attention_mask', 'input_ids'\]"):
        validate_repository(repo)
