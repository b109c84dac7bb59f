"""Issue 6, case by case: bad input, faults and load, with nothing lost and the server never left broken.

Every test here is one case of the reliability harness: `make test-reliability` runs them with the
cases that live in other modules (conftest.RELIABILITY_CASES) and ends with "N cases tried, M handled
as specified". Messages are asserted with their exact text: docs/RELIABILITY.md quotes them.
The soak test is `slow` (minutes); SOAK_S sets its length in seconds.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from builder.cli import app
from builder.errors import RunError
from builder.manifest import load_reference, read_manifest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parent.parent
TRITON_BUILDER = Path(sys.executable).parent / "triton-builder"
TINY_BERT = ("{model_type: bert, vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, "
             "intermediate_size: 32, max_position_embeddings: 64}")
SPEC = f"""
defaults: {{max_batch_size: 4, dynamic_batching: {{max_queue_delay_us: 100}}}}
models:
  - name: enc
    task: feature-extraction
    source: {{config: {TINY_BERT}}}
    shapes: {{max_sequence_length: 32, sequence_length: 8}}
    variants: [{{format: onnx, precision: fp32}}, {{format: torch, precision: fp32}}]
"""
# A factory whose model uses an operator the ONNX exporter has no translation for, and a plain one.
FACTORIES = '''
import torch


@torch.library.custom_op("tb_reliability::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.tb_reliability.mystery(self.lin(x))


def unexportable():
    torch.manual_seed(0)
    return Mystery(), {"x": torch.randn(2, 4)}


def small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), {"x": torch.randn(2, 4)}
'''
BAD_MODEL = """
  - name: bad
    task: feature-extraction
    source: {factory: "tb_reliability_factories:unexportable"}
    variants: [{format: onnx, precision: fp32}, {format: torch, precision: fp32}]
"""
GOOD_MODEL = """
  - name: good
    task: feature-extraction
    source: {factory: "tb_reliability_factories:small"}
    variants: [{format: torch, precision: fp32}]
"""
EXPORT_ERROR = ("error: models[bad].variants[onnx_fp32]: export: torch.onnx export failed: DispatchError: No ONNX "
                "function found for <OpOverload(op='tb_reliability.mystery', overload='default')>. Failure message: "
                "No decompositions registered for the real-valued input")


# --- helpers ---------------------------------------------------------------------------------

def tree_state(path: Path) -> dict[str, str]:
    """Every file and directory under `path` (hidden ones too) -> its content hash ('dir' for directories)."""
    state = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        state[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return state


def litter(out: Path) -> list[str]:
    """What a build must never leave: staging beside the repository, old model dirs, the lock, temp files."""
    found = [p.name for p in out.parent.glob(f".{out.name}.staging-*")]
    if out.is_dir():
        found += [p.name for p in out.glob(".*.old-*")] + [p.name for p in out.glob("*.tmp")]
        found += [p.name for p in out.glob(".triton-builder.lock")]
    return found


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def processes_naming(path: Path) -> list[int]:
    """Live processes whose command line mentions `path` (a server and its stubs name the repository)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(path).encode() in (proc / "cmdline").read_bytes():
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                found += [int(proc.name)] if state not in ("Z", "X") else []
        except OSError:
            continue
    return found


def group_alive(pgid: int) -> list[int]:
    from builder.runtime.local import group_members

    return group_members(pgid)


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A built repository of a tiny BERT (onnx and torch variants), its spec in a directory whose name
    a shell would run: it reaches the manifest's commands only as a quoted argument."""
    from builder.build import build

    root = tmp_path_factory.mktemp("reliability") / "specs; echo pwned > pwned.txt"
    root.mkdir()
    (root / "spec.yaml").write_text(SPEC)
    result = build(root / "spec.yaml", root / "repo", console=Console(file=io.StringIO()))
    assert not result.failed
    return root / "spec.yaml", root / "repo"


@pytest.fixture(scope="module")
def factories(importable):
    return importable("tb_reliability_factories", FACTORIES)


@pytest.fixture(scope="module")
def served(built):
    from builder.runtime import start_server

    with start_server(built[1]) as server:
        yield server
    assert group_alive(server.pid) == []


def copy_repo(built, dst: Path) -> Path:
    shutil.copytree(built[1], dst)
    return dst


# --- build side: bad specs -------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ('models: !!python/object/apply:os.system ["touch {marker}"]\n',
     "not valid YAML at line 1, column 9: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    (f"models:\n  - {{name: enc, task: feature-extraction, source: {{config: {TINY_BERT}}}, "
     "variants: [{format: torch, precision: int8}]}\n",
     "models[0](enc): variant torch_int8: torch int8 is not supported here: weight-only int8 (torchao) is the "
     "generation endpoint's; use format onnx for int8"),
    (f"models:\n  - {{name: enc, task: feature-extraction, source: {{config: {TINY_BERT}}}, "
     "instances: {count: 0}, variants: [{format: onnx}]}\n",
     "models[0](enc).instances.count: Input should be greater than or equal to 1; got 0; write 1 or more"),
], ids=["unsafe_yaml_tag", "torch_int8", "zero_instances"])
def test_more_bad_specs_exit_2_and_run_nothing(tmp_path, text, expected):
    marker = tmp_path / "ran"
    spec = tmp_path / "spec.yaml"
    spec.write_text(text.replace("{marker}", str(marker)))
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "repo")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {spec}: {expected}"
    assert not marker.exists() and not (tmp_path / "repo").exists()


# --- build side: failures, interrupts, the lock ----------------------------------------------

def test_failing_export_names_model_variant_step_and_operator_and_changes_nothing(built, factories, tmp_path):
    out = copy_repo(built, tmp_path / "repo")
    before = tree_state(out)
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + BAD_MODEL)
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(out)])
    assert result.exit_code == 1
    assert error_lines(result.output) == [EXPORT_ERROR]
    assert result.output.splitlines()[-1] == "1 variant(s) did not pass; see the table above"
    assert "bad: not installed" in result.output
    assert tree_state(out) == before  # bad_torch_fp32 passed, but its model failed: nothing moved in
    assert litter(out) == []


def test_failing_export_into_a_new_directory_leaves_nothing(factories, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + BAD_MODEL)
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "new"), "--no-cache"])
    assert result.exit_code == 1 and error_lines(result.output) == [EXPORT_ERROR]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_keep_going_builds_the_others_and_reports_the_failure(factories, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + BAD_MODEL + GOOD_MODEL)
    out = tmp_path / "repo"
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(out), "--keep-going"])
    assert result.exit_code == 1
    assert error_lines(result.output) == [EXPORT_ERROR]
    assert result.output.splitlines()[-1] == "1 variant(s) did not pass; see the table above"
    assert {p.name for p in out.iterdir()} == {"bad_torch_fp32", "good_torch_fp32", "triton-builder.json"}
    assert sorted(read_manifest(out)["models"]) == ["bad_torch_fp32", "good_torch_fp32"]
    assert litter(out) == []


@pytest.mark.parametrize("sig, name, code", [(signal.SIGTERM, "SIGTERM", 143), (signal.SIGINT, "Ctrl-C", 130)],
                         ids=["sigterm", "sigint"])
def test_signal_during_build_keeps_the_old_repository(built, tmp_path, sig, name, code):
    spec, _ = built
    out = copy_repo(built, tmp_path / "repo")
    before = tree_state(out)
    proc = subprocess.Popen([str(TRITON_BUILDER), "build", str(spec), "-o", str(out), "--no-cache"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 120
        while not any("exporting" in line for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        time.sleep(0.5)  # inside the exporter now
        proc.send_signal(sig)
        assert proc.wait(60) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    assert seen[-1].rstrip("\n") == f"error: {name}: build stopped; {out} has only complete models, no staging left"
    assert tree_state(out) == before
    assert litter(out) == []


def test_second_build_into_the_same_output_is_refused(built, tmp_path):
    from builder.repository import locked

    out = copy_repo(built, tmp_path / "repo")
    with locked(out):
        before = tree_state(out)
        result = CliRunner().invoke(app, ["build", str(built[0]), "-o", str(out)])
        assert tree_state(out) == before
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {out}: another build is writing this repository (pid {os.getpid()}); "
                                     "wait for it or use -o elsewhere")
    assert litter(out) == []


def test_what_a_killed_build_left_is_cleaned_by_the_next(built, tmp_path):
    from builder.build import build

    out = copy_repo(built, tmp_path / "repo")
    stale = [tmp_path / ".repo.staging-k1ll3d", out / ".enc_onnx_fp32.old-4242"]
    for path in stale:
        (path / "1").mkdir(parents=True)
    (out / "triton-builder.json.tmp").write_text("{")
    build(built[0], out, console=Console(file=io.StringIO()))  # from the cache: quick
    assert litter(out) == []


# --- build side: the cache -------------------------------------------------------------------

def test_unchanged_rebuild_reuses_the_cache(built, tmp_path, monkeypatch):
    import builder.build as build_mod
    import builder.sources as sources

    def never(*args, **kwargs):
        raise AssertionError("exported or loaded again")

    monkeypatch.setattr(build_mod, "make_artifact", never)
    monkeypatch.setattr(sources, "load_source", never)
    console = Console(file=io.StringIO(), width=200)
    result = build_mod.build(built[0], tmp_path / "again", console=console)
    assert [(r.triton_name, r.status, r.cached) for r in result.results] == [
        ("enc_onnx_fp32", "passed", True), ("enc_torch_fp32", "passed", True)]
    log = console.file.getvalue()
    assert "  enc_onnx_fp32: cached\n" in log and "passed (cached)" in log
    for name in ("enc_onnx_fp32", "enc_torch_fp32"):
        assert tree_state(tmp_path / "again" / name) == tree_state(built[1] / name)
    again, first = read_manifest(tmp_path / "again")["models"], read_manifest(built[1])["models"]
    assert {(n, k, str(e[k]), str(first[n].get(k))) for n, e in again.items() for k in e if e[k] != first[n].get(k)} == set()


def test_a_changed_input_invalidates_the_cache(built, tmp_path, monkeypatch):
    import builder.build as build_mod

    def export_again(*args, **kwargs):
        raise RunError("exported again")

    monkeypatch.setattr(build_mod, "make_artifact", export_again)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("sequence_length: 8", "sequence_length: 9"))
    result = build_mod.build(spec, tmp_path / "repo", keep_going=True, console=Console(file=io.StringIO()))
    assert [(r.triton_name, r.status, r.step, r.message) for r in result.results] == [
        ("enc_onnx_fp32", "error", "export", "exported again"), ("enc_torch_fp32", "error", "export", "exported again")]
    result = build_mod.build(built[0], tmp_path / "repo", cache=False, keep_going=True,
                             console=Console(file=io.StringIO()))  # --no-cache: never read
    assert {r.message for r in result.results} == {"exported again"}


def test_cache_keys_follow_source_files_tools_and_variant(tmp_path):
    from builder.cache import variant_keys
    from builder.spec import load_spec

    model_dir = tmp_path / "local"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "bert"}')
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("models:\n  - {name: m, task: feature-extraction, source: {path: local}, "
                         "variants: [{format: onnx}, {format: onnx, precision: int8}]}\n")
    spec = load_spec(spec_path)

    def keys(tools=None):
        return variant_keys(spec, spec_path, spec.models[0], "python", tools or {"torch": "2.13.0"})

    first = keys()
    assert first == keys() and len(set(first.values())) == 2
    assert keys({"torch": "2.14.0"}) != first
    (model_dir / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    time.sleep(0.01)
    second = keys()
    assert second["onnx_fp32"] != first["onnx_fp32"] and second["onnx_int8"] != first["onnx_int8"]


def test_a_damaged_cache_entry_is_dropped(tmp_path):
    from builder.cache import BuildCache
    from builder.repository import file_records

    model = tmp_path / "m_onnx_fp32"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(b"weights")
    cache = BuildCache(tmp_path / "cache")
    cache.store("ab" * 32, "onnx_fp32", {model.name: (model, {"files": file_records(model)})})
    hit = cache.lookup("ab" * 32)
    assert hit is not None and list(hit.models) == [model.name]
    (hit.path / model.name / "1" / "model.onnx").write_bytes(b"weightz")
    assert cache.lookup("ab" * 32) is None and not hit.path.exists()


# --- serve and perf side: clear errors before any process starts -----------------------------

@pytest.fixture
def no_server(monkeypatch):
    """Any attempt to start a server process fails the test (the checks must come first)."""
    from builder.runtime import local

    def refuse(*args, **kwargs):
        raise AssertionError("a server was started")

    monkeypatch.setattr(local, "_launch", refuse)
    monkeypatch.setattr(local, "stub_env", refuse)


def test_serve_a_missing_repository(no_server, tmp_path):
    repo = tmp_path / "nowhere"
    result = CliRunner().invoke(app, ["serve", str(repo), "--once"])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {repo}: not a directory; build one with 'triton-builder build SPEC -o {repo}'"


def broken_copy(built, tmp_path) -> Path:
    repo = copy_repo(built, tmp_path / "broken")
    (repo / "enc_onnx_fp32" / "1" / "model.onnx").unlink()
    return repo


def broken_message(repo: Path) -> list[str]:
    return [f"error: {repo}: 2 problem(s):",
            "  enc_onnx_fp32/1: artifact model.onnx (parameters.artifact) is missing",
            "  enc_onnx_fp32: file 1/model.onnx listed in triton-builder.json is missing"]


def test_serve_a_repository_that_fails_validate(no_server, built, tmp_path):
    repo = broken_copy(built, tmp_path)
    result = CliRunner().invoke(app, ["serve", str(repo), "--once"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == broken_message(repo)


def test_perf_on_a_repository_that_fails_validate(no_server, built, tmp_path):
    repo = broken_copy(built, tmp_path)
    result = CliRunner().invoke(app, ["perf", str(repo), "--out", str(tmp_path / "results")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == broken_message(repo)
    assert not (tmp_path / "results").exists()


def test_serve_a_repository_with_a_damaged_artifact(no_server, built, tmp_path):
    repo = copy_repo(built, tmp_path / "damaged")
    (repo / "enc_torch_fp32" / "1" / "model.pt2").write_bytes(b"not a program")
    result = CliRunner().invoke(app, ["serve", str(repo), "--once"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {repo}: 1 problem(s):",
        "  enc_torch_fp32: file 1/model.pt2 differs from the one built (size or sha256 in triton-builder.json); "
        "rebuild the repository"]


@pytest.mark.server
def test_serve_a_model_that_fails_to_load_names_it_with_log_lines_and_leaves_no_process(tmp_path):
    repo = tmp_path / "repo"
    for name, code in (("fine", "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"),
                       ("broken", "class TritonPythonModel:\n    def initialize(self, args):\n"
                                  "        raise RuntimeError('boom from initialize')\n")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.py").write_text(code)
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
            'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    result = CliRunner().invoke(app, ["serve", str(repo), "--once", "--no-check",
                                      "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[:2] == ["error: 1 model(s) failed to load: broken", "- broken: Internal: RuntimeError: boom from initialize"]
    log = re.fullmatch(r"log (/\S+/tritonserver-\w+\.log), last (\d+) relevant line\(s\):", lines[2])
    assert log, lines[2]
    assert len(lines) == 3 + int(log[2]) and any("failed to load 'broken'" in line for line in lines[3:])
    Path(log[1]).unlink()  # kept for the user on a failed start; this test has read it
    assert processes_naming(repo) == []


def test_serve_on_a_port_in_use(no_server, built):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(built[1]), "--once", "--http-port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: port {port} is in use; pick another with --http-port"


# --- serve side: a server killed during perf -------------------------------------------------

class _Watch(io.StringIO):
    """A console file that calls `then` once a line containing `needle` has been written."""

    def __init__(self, needle: str, then):
        super().__init__()
        self.needle, self.then, self.fired = needle, then, False

    def write(self, text):
        n = super().write(text)
        if not self.fired and self.needle in self.getvalue():
            self.fired = True
            self.then()
        return n


@pytest.mark.server
def test_server_killed_during_perf_keeps_partial_results_marked_incomplete(built, tmp_path):
    from builder.perf import run_perf, write_report
    from builder.perf.results import load_results
    from builder.runtime import start_server

    repo = copy_repo(built, tmp_path / "repo")
    out = tmp_path / "run"
    with start_server(repo) as server:
        watch = _Watch("enc_onnx_fp32 c=1:", lambda: os.kill(server.pid, signal.SIGKILL))
        with pytest.raises(RunError) as info:
            run_perf(repo, server=server, concurrency=(1, 2), measurement_ms=500, out=out,
                     console=Console(file=watch, width=200))
    assert group_alive(server.pid) == []  # the stubs went with the server
    lines = str(info.value).splitlines()
    assert lines[0] == f"the Triton server at {server.grpc_url} stopped answering while enc_onnx_fp32 was measured"
    assert lines[1].startswith("perf_analyzer -m enc_onnx_fp32 failed (exit ")
    assert lines[-1] == f"partial results kept in {out} (marked incomplete)"
    table, manifest = load_results(out)
    assert manifest["complete"] is False and manifest["errors"][0] == lines[0]
    status = {(r.variant, r.concurrency): r.status for r in table.itertuples()}
    assert status == {("enc_onnx_fp32", 1): "ok", ("enc_onnx_fp32", 2): "failed",
                      ("enc_torch_fp32", 1): "not_run", ("enc_torch_fp32", 2): "not_run"}
    assert "**Incomplete run.**" in write_report(out).read_text()


# --- serve side: malformed requests ----------------------------------------------------------

def _good(batch: int = 2, length: int = 8) -> dict[str, np.ndarray]:
    return {"input_ids": np.full((batch, length), 5, np.int64), "attention_mask": np.ones((batch, length), np.int64),
            "token_type_ids": np.zeros((batch, length), np.int64)}


# case -> (inputs, the exact message; {model} is the Triton model's name)
MALFORMED = {
    "wrong_dtype": ({**_good(), "input_ids": _good()["input_ids"].astype(np.int32)},
                    "[request id: <id_unknown>] inference input 'input_ids' data-type is 'INT32', but model '{model}' "
                    "expects 'INT64'"),
    "wrong_shape": ({**_good(), "input_ids": _good()["input_ids"][..., None]},
                    "[request id: <id_unknown>] unexpected shape for input 'input_ids' for model '{model}'. Expected "
                    "[-1,-1], got [2,8,1]. NOTE: Setting a non-zero max_batch_size in the model config requires a batch "
                    "dimension to be prepended to each input shape. If you want to specify the full shape including the "
                    "batch dim in your input dims config, try setting max_batch_size to zero. See the model "
                    "configuration docs for more info on max_batch_size."),
    "empty_batch": (_good(0),
                    "[request id: <id_unknown>] input byte size mismatch for input 'token_type_ids' for model "
                    "'{model}'. Expected 64, got 0"),
    "longer_than_max_length": (_good(2, 200),
                               "input_ids: shape [2, 200] is above the maximum [32] this model was built for "
                               "(shapes.max_sequence_length in the spec)"),
    "ids_outside_the_vocabulary": ({**_good(), "input_ids": np.full((2, 8), 5000, np.int64)},
                                   "input_ids: values must be in [0, 100) (the vocabulary); got 5000 to 5000"),
    "mismatched_lengths": ({**_good(), "attention_mask": np.ones((2, 5), np.int64)},
                           "attention_mask: shape [2, 5] differs from input_ids [2, 8]; they must be the same"),
    "batch_above_max_batch_size": (_good(5),
                                   "[request id: <id_unknown>] inference request batch-size must be <= 4 for '{model}'"),
    "missing_input": ({k: v for k, v in _good().items() if k != "attention_mask"},
                      "[request id: <id_unknown>] expected 3 inputs but got 2 inputs for model '{model}'. Got input(s) "
                      "['token_type_ids','input_ids'], but missing required input(s) ['attention_mask']. Please "
                      "provide all required input(s)."),
}


def _infer(server, protocol: str, model: str, arrays: dict[str, np.ndarray]):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    try:
        tensors = []
        for name, value in arrays.items():
            tensor = module.InferInput(name, list(value.shape), "INT32" if value.dtype == np.int32 else "INT64")
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return client.infer(model, tensors)
    finally:
        client.close()


@pytest.mark.server
@pytest.mark.parametrize("model, protocol", [("enc_onnx_fp32", "grpc"), ("enc_onnx_fp32", "http"),
                                             ("enc_torch_fp32", "grpc")])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_an_error_and_the_next_valid_one_is_answered(served, built, case, model, protocol):
    from tritonclient.utils import InferenceServerException

    arrays, message = MALFORMED[case]
    with pytest.raises(InferenceServerException) as info:
        _infer(served, protocol, model, arrays)
    assert info.value.message() == message.format(model=model)
    assert str(info.value.status()) == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT")
    inputs, outputs = load_reference(built[1] / model / "reference.npz")
    result = _infer(served, protocol, model, inputs)
    np.testing.assert_allclose(result.as_numpy("last_hidden_state"), outputs["last_hidden_state"], atol=1e-4)


# --- security --------------------------------------------------------------------------------

def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.server
def test_the_local_server_listens_on_loopback_only_and_refuses_model_control(served):
    from builder.runtime.server import http_request

    for url in (served.http_url, served.grpc_url, served.metrics_url):
        # 127.0.0.1 (IPv4, or IPv4-mapped in tcp6), nothing else
        assert _listening_addresses(int(url.rsplit(":", 1)[1])) <= {"0100007F", "0000000000000000FFFF00000100007F"}
        assert _listening_addresses(int(url.rsplit(":", 1)[1]))
    assert not any(arg.startswith("--model-control-mode") for arg in served.command)
    assert http_request(served.http_url, "/v2/repository/models/enc_onnx_fp32/unload", method="POST") == (
        503, b'{"error":"explicit model load / unload is not allowed if polling is enabled"}')


def test_loopback_is_the_default_everywhere():
    import inspect

    from builder.runtime import start_server
    from builder.runtime.docker import container_spec

    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(container_spec).parameters["host"].default == "127.0.0.1"
    serve = next(c for c in app.registered_commands if c.name == "serve" or c.callback.__name__ == "serve")
    assert inspect.signature(serve.callback).parameters["host"].default.default == "127.0.0.1"


def test_subprocesses_get_argument_lists_never_shell_strings():
    problems = []
    for path in sorted((ROOT / "builder").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                problems.append(f"{path.name}:{node.lineno}: {name}")
            if name.startswith("subprocess."):
                if any(k.arg == "shell" for k in node.keywords):
                    problems.append(f"{path.name}:{node.lineno}: shell=")
                if node.args and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
                    problems.append(f"{path.name}:{node.lineno}: a string command")
    assert problems == []


def test_nothing_from_the_spec_is_spliced_into_code_or_commands(built):
    spec, repo = built
    runner = (ROOT / "templates" / "python" / "runner.py").read_bytes()
    for name, entry in read_manifest(repo)["models"].items():
        assert (repo / name / "1" / "model.py").read_bytes() == runner  # copied, configured by parameters
        assert shlex.split(entry["command"])[:3] == ["triton-builder", "build", str(spec)]
    assert not (spec.parent / "pwned.txt").exists()


# --- load: the soak test ---------------------------------------------------------------------

def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _counter(metrics: str, name: str, model: str) -> float:
    prefix = f'{name}{{model="{model}",version="1"}} '
    return sum(float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix))


@pytest.mark.slow
@pytest.mark.server
def test_soak_sustained_load_has_no_failures_and_stable_memory(built, tmp_path, record_property):
    """perf_analyzer at concurrency 4 for SOAK_S seconds (default 180); server + stub RSS sampled from /proc."""
    from builder.manifest import signature_of
    from builder.perf.analyzer import find_perf_analyzer, perf_env
    from builder.perf.inputs import write_input_data
    from builder.runtime import start_server
    from builder.runtime.server import http_request

    seconds = float(os.environ.get("SOAK_S", "180"))
    model = "enc_onnx_fp32"
    repo = copy_repo(built, tmp_path / "repo")
    data = write_input_data(signature_of(read_manifest(repo)["models"][model]), tmp_path / "input.json")
    with start_server(repo) as server:
        samples: list[tuple[float, int, int]] = []  # (seconds since start, server KiB, stubs KiB)
        stop = threading.Event()

        def sample():
            t0 = time.monotonic()
            while not stop.wait(1.0):
                members = group_alive(server.pid)
                stubs = sum(_rss_kib(pid) for pid in members if pid != server.pid)
                samples.append((time.monotonic() - t0, _rss_kib(server.pid), stubs))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        window_ms = int(seconds * 1000 / 3)
        argv = [str(find_perf_analyzer()), "-m", model, "-u", server.grpc_url, "-i", "grpc", "--concurrency-range", "4",
                "-p", str(window_ms), "-s", "1000", "-r", "3", "--input-data", str(data), "-f", str(tmp_path / "soak.csv")]
        try:
            done = subprocess.run(argv, env=perf_env(), capture_output=True, text=True, timeout=seconds * 2 + 120)
        finally:
            stop.set()
            sampler.join()
        metrics = http_request(server.metrics_url, "/metrics")[1].decode()
    assert done.returncode == 0, done.stderr[-2000:]
    success = _counter(metrics, "nv_inference_request_success", model)
    failure = _counter(metrics, "nv_inference_request_failure", model)
    def mib(column: int, late: bool) -> float:
        """Median RSS (MiB) of a window: 10-30 s in (start-up allocations settled), or the last 20 s."""
        last = samples[-1][0]
        window = [s for s in samples if (s[0] >= last - 20 if late else 10 <= s[0] < 30)]
        return float(np.median([sum(s[1:]) if column == 0 else s[column] for s in window])) / 1024

    start, end = mib(0, False), mib(0, True)
    note = (f"soak: {seconds:.0f} s of perf_analyzer at concurrency 4 on {model}: {success:.0f} requests, "
            f"{failure:.0f} failed; RSS server {mib(1, False):.1f} -> {mib(1, True):.1f} MiB, "
            f"stubs {mib(2, False):.1f} -> {mib(2, True):.1f} MiB, together {start:.1f} -> {end:.1f} MiB "
            f"(peak {max(sum(s[1:]) for s in samples) / 1024:.1f} MiB, {len(samples)} samples)")
    record_property("reliability_note", note)
    print(note)
    assert failure == 0 and success > 0
    assert end - start < max(32.0, start / 10), note  # no steady growth: under 10% (or 32 MiB)
