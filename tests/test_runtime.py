"""builder.runtime: start/stop a Triton server, readiness, self-check, the docker container spec.

The `server` tests start the tritonserver bundled in nvidia-pytriton on a tiny hand-made
repository (python backend models); the module shares one server where it can.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import textwrap
from pathlib import Path

import numpy as np
import pytest

from builder.errors import RunError, UserError
from builder.manifest import MANIFEST, save_reference
from builder.runtime import (DEFAULT_IMAGE, CheckResult, ServerHandle, container_spec, docker_available,
                             self_check, start_server)
from builder.runtime import docker as docker_mod
from builder.runtime import local, server as server_mod
from builder.runtime.ports import resolve_ports, url
from builder.runtime.selfcheck import check_model, compare
from builder.runtime.server import log_excerpt
from builder.signature import Signature, TensorSpec

# --- a tiny repository, written by hand -------------------------------------------------------

DOUBLER_CONFIG = """
name: "doubler"
backend: "python"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

DOUBLER_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", (2 * x).astype(np.float32))]))
        return responses
"""

SHOUT_CONFIG = """
name: "shout"
backend: "python"
max_batch_size: 8
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "LOUD" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

SHOUT_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            loud = np.array([[s.upper() for s in row] for row in text], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("LOUD", loud)]))
        return responses
"""

BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("boom from initialize")

    def execute(self, requests):
        return []
"""

DOUBLER_SIG = Signature(inputs=(TensorSpec("INPUT", "float32", (4,)),),
                        outputs=(TensorSpec("OUTPUT", "float32", (4,)),), max_batch_size=8)
SHOUT_SIG = Signature(inputs=(TensorSpec("TEXT", "bytes", (1,), kind="text"),),
                      outputs=(TensorSpec("LOUD", "bytes", (1,), kind="text"),), max_batch_size=8)
X = np.arange(8, dtype=np.float32).reshape(2, 4) - 3.5


def add_model(repo: Path, name: str, config: str, model_py: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config).replace('"doubler"', f'"{name}"'))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py))


def write_manifest(repo: Path, models: dict) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / MANIFEST).write_text(json.dumps({"schema": 1, "builder_version": "test", "runtime": "python",
                                             "models": models}, indent=2))


def entry(sig: Signature, reference: str | None = None, tolerance: dict | None = None) -> dict:
    out = {"role": "variant", "status": "passed", "signature": sig.to_dict(), "reference": reference}
    if tolerance is not None:
        out["verification"] = {"passed": True, "tolerance": tolerance}
    return out


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    add_model(repo, "doubler", DOUBLER_CONFIG, DOUBLER_MODEL)
    add_model(repo, "shout", SHOUT_CONFIG, SHOUT_MODEL)
    save_reference(repo / "doubler" / "reference.npz", {"INPUT": X}, {"OUTPUT": 2 * X})
    # text references are fixed-width bytes ('S'): load_reference refuses pickled object arrays
    save_reference(repo / "shout" / "reference.npz", {"TEXT": np.array([[b"hi"], [b"triton"]])},
                   {"LOUD": np.array([[b"HI"], [b"TRITON"]])})
    write_manifest(repo, {"doubler": entry(DOUBLER_SIG, "reference.npz", {"atol": 1e-6, "rtol": 1e-6}),
                          "shout": entry(SHOUT_SIG, "reference.npz")})
    return repo


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the server and its stubs name the repo)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def shm_prefix(handle: ServerHandle) -> str:
    flag = next(arg for arg in handle.command if "shm-region-prefix-name=" in arg)
    return flag.split("shm-region-prefix-name=", 1)[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def server(repo):
    with start_server(repo, log_path=repo.parent / "server.log") as handle:
        yield handle
    assert processes_mentioning(str(repo)) == []
    assert handle.log_path.exists()  # a log path given by the caller is kept


# --- server tests ------------------------------------------------------------------------------

@pytest.mark.server
def test_server_is_ready_on_free_loopback_ports(server, repo):
    assert server.models == ("doubler", "shout")
    assert server.runtime == "local" and server.pid and server.running
    assert all(u.startswith("127.0.0.1:") for u in (server.http_url, server.grpc_url, server.metrics_url))
    assert len({server.http_url, server.grpc_url, server.metrics_url}) == 3
    assert f"--model-repository={repo}" in server.command
    assert server_mod.http_request(server.http_url, "/v2/health/ready")[0] == 200
    assert b"nv_inference_count" in server_mod.http_request(server.metrics_url, "/metrics")[1]


@pytest.mark.server
def test_http_and_grpc_infer_return_doubled_values(server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    for client_mod, client in ((httpclient, httpclient.InferenceServerClient(server.http_url)),
                               (grpcclient, grpcclient.InferenceServerClient(server.grpc_url))):
        tensor = client_mod.InferInput("INPUT", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("doubler", [tensor])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT"), 2 * X)
        client.close()


@pytest.mark.server
def test_self_check_passes(server, repo):
    results = self_check(server, repo)
    assert results == [CheckResult("doubler", True, 0.0, pytest.approx(1.0), "ok"),
                       CheckResult("shout", True, None, None, "ok")]


@pytest.mark.server
def test_self_check_without_reference_sends_generated_inputs(server, tmp_path):
    write_manifest(tmp_path, {"doubler": entry(DOUBLER_SIG), "shout": entry(SHOUT_SIG)})
    assert [r.ok for r in self_check(server, tmp_path)] == [True, True]


@pytest.mark.server
def test_self_check_wrong_reference_fails_naming_the_model(server, tmp_path):
    (tmp_path / "doubler").mkdir()
    save_reference(tmp_path / "doubler" / "ref.npz", {"INPUT": X}, {"OUTPUT": 2 * X + 0.5})
    write_manifest(tmp_path, {"doubler": entry(DOUBLER_SIG, "ref.npz", {"atol": 1e-3, "rtol": 0}),
                              "shout": entry(SHOUT_SIG)})
    with pytest.raises(RunError) as info:
        self_check(server, tmp_path)
    assert str(info.value).splitlines()[:3] == [
        "self-check failed for 1 of 2 model(s): doubler",
        "doubler:",
        "- OUTPUT: max diff = 0.5 (atol 0.001, rtol 0), cosine 0.994100",
    ]
    assert [r.ok for r in info.value.results] == [False, True]


@pytest.mark.server
def test_self_check_reports_every_failing_model(server, tmp_path):
    wrong_dims = Signature(inputs=DOUBLER_SIG.inputs, outputs=(TensorSpec("OUTPUT", "float32", (5,)),),
                           max_batch_size=8)
    (tmp_path / "shout").mkdir()
    save_reference(tmp_path / "shout" / "ref.npz", {"TEXT": np.array([["a"]])}, {"LOUD": np.array([["a"]])})
    write_manifest(tmp_path, {"doubler": entry(wrong_dims), "shout": entry(SHOUT_SIG, "ref.npz"),
                              "absent": entry(DOUBLER_SIG), "rejected": {**entry(DOUBLER_SIG), "status": "failed"}})
    with pytest.raises(RunError) as info:
        self_check(server, tmp_path)
    assert str(info.value).splitlines() == [
        "self-check failed for 3 of 3 model(s): doubler, shout, absent",
        "doubler:",
        "- OUTPUT: shape (1, 4) does not match the declared (1, 5)",
        "shout:",
        "- LOUD: text differs from the reference",
        "absent:",
        "- not loaded by the server (loaded: doubler, shout)",
    ]


@pytest.mark.server
def test_failed_model_raises_run_error_and_leaves_nothing(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "doubler", DOUBLER_CONFIG, DOUBLER_MODEL)
    add_model(repo, "broken", DOUBLER_CONFIG, BROKEN_MODEL)
    log = tmp_path / "server.log"
    with pytest.raises(RunError) as info:
        start_server(repo, log_path=log, ready_timeout=60)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == "1 model(s) failed to load: broken"
    assert lines[1].startswith("- broken: Internal: RuntimeError: boom from initialize")
    assert lines[2].startswith(f"log {log}, last ")
    assert any("failed to load 'broken'" in line for line in lines[3:])
    assert len(lines) <= 3 + server_mod.LOG_LINES
    assert processes_mentioning(str(repo)) == []
    assert "boom from initialize" in log.read_text()  # the log is kept


@pytest.mark.server
def test_server_never_outlives_the_with_block(tmp_path):
    repo = make_repo(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with start_server(repo, log_path=tmp_path / "server.log") as handle:
            assert processes_mentioning(str(repo))
            os.kill(handle.pid, signal.SIGKILL)  # a crash: the stub is left behind with its shm region
            1 / 0
    assert processes_mentioning(str(repo)) == []
    assert not Path(f"/proc/{handle.pid}").exists() or "Z" in Path(f"/proc/{handle.pid}/stat").read_text()
    assert list(Path("/dev/shm").glob(shm_prefix(handle) + "*")) == []
    assert not handle.running
    handle.stop()  # twice is fine


@pytest.mark.server
def test_interrupt_while_waiting_stops_the_server(tmp_path, monkeypatch):
    repo = make_repo(tmp_path)

    def interrupted(url):
        raise KeyboardInterrupt

    monkeypatch.setattr(server_mod, "repository_index", interrupted)
    with pytest.raises(KeyboardInterrupt):
        start_server(repo, log_path=tmp_path / "server.log")
    assert processes_mentioning(str(repo)) == []
    assert [h for h in server_mod._live if h.repo == repo] == []


NUMPY2_PYTHON = os.environ.get("TRITON_BUILDER_NUMPY2_PYTHON")  # bin/python3 of a venv with numpy 2


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(not NUMPY2_PYTHON, reason="set TRITON_BUILDER_NUMPY2_PYTHON to a venv's bin/python3 with numpy 2")
def test_self_check_catches_the_numpy_2_stub(tmp_path, monkeypatch):
    python = Path(NUMPY2_PYTHON)
    with pytest.raises(UserError, match="under numpy 2 the python backend returns empty outputs"):
        local.stub_env(python)
    real = local.StubEnv(python=python, **{k: v for k, v in vars(local.stub_env()).items() if k != "python"})
    monkeypatch.setattr(local, "stub_env", lambda _: real)  # what start_server refuses, served anyway
    repo = make_repo(tmp_path)
    with start_server(repo, stub_python=python, log_path=tmp_path / "server.log") as handle:
        with pytest.raises(RunError) as info:
            self_check(handle, repo)
    lines = str(info.value).splitlines()
    assert lines[:3] == ["self-check failed for 2 of 2 model(s): doubler, shout", "doubler:",
                         "- OUTPUT: empty (shape (0,)); the python backend does this under numpy 2"]
    assert "is not healthy" in lines[4]


# --- no server needed --------------------------------------------------------------------------

@pytest.fixture
def listening():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("option, flag", [("http_port", "--http-port"), ("grpc_port", "--grpc-port"),
                                          ("metrics_port", "--metrics-port")])
def test_busy_port_is_a_user_error_before_anything_starts(tmp_path, monkeypatch, listening, option, flag):
    def no_launch(*args, **kwargs):
        raise AssertionError("started a server")

    monkeypatch.setattr(local, "_launch", no_launch)
    monkeypatch.setattr(local, "stub_env", no_launch)
    with pytest.raises(UserError) as info:
        start_server(tmp_path, **{option: listening})
    assert str(info.value) == f"port {listening} is in use; pick another with {flag}"


def test_same_port_twice_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="^port 9000 is given for both --http-port and --grpc-port; "):
        start_server(tmp_path, http_port=9000, grpc_port=9000)


def test_free_ports_are_distinct():
    ports = resolve_ports("127.0.0.1", {"http": None, "grpc": None, "metrics": None})
    assert len(set(ports.values())) == 3 and all(p > 1023 for p in ports.values())
    assert url("0.0.0.0", 8000) == "127.0.0.1:8000" and url("::1", 8000) == "[::1]:8000"


def test_bad_arguments_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="^unknown runtime 'podman'; choose one of: local, docker$"):
        start_server(tmp_path, "podman")
    with pytest.raises(UserError, match="no such model repository"):
        start_server(tmp_path / "missing")
    with pytest.raises(UserError, match="not an executable tritonserver"):
        start_server(tmp_path, tritonserver=tmp_path / "nope")


def fake_python(tmp_path: Path, numpy: str | None) -> Path:
    python = tmp_path / "env" / "bin" / "python3"
    python.parent.mkdir(parents=True)
    info = {"version": "3.11", "prefix": str(tmp_path / "env"), "numpy": numpy, "libdir": "/nowhere",
            "soname": "libpython3.11.so.1.0"}
    python.write_text(f"#!/bin/sh\necho '{json.dumps(info)}'\n")
    python.chmod(0o755)
    return python


def test_numpy_2_in_the_stub_environment_is_refused(tmp_path):
    with pytest.raises(UserError) as info:
        local.stub_env(fake_python(tmp_path, "2.1.3"))
    assert str(info.value) == (f"numpy 2.1.3 in {tmp_path / 'env'}: under numpy 2 the python backend returns "
                               f"empty outputs; install 'numpy<2' there or give --stub-python a Python with numpy<2")


def test_stub_environment_without_numpy_or_shared_libpython_is_refused(tmp_path):
    with pytest.raises(UserError, match="^numpy is not installed in "):
        local.stub_env(fake_python(tmp_path / "a", None))
    with pytest.raises(UserError, match="no shared libpython3.11.so.1.0 in /nowhere"):
        local.stub_env(fake_python(tmp_path / "b", "1.26.4"))


def test_this_environment_serves_with_the_bundled_server(tmp_path):
    layout = local.layout_of(local.find_tritonserver())
    env = local.stub_env()
    assert layout.stubs is not None and layout.libs is not None and env.numpy.startswith("1.")
    backends = local.private_backends(layout, env, tmp_path)
    assert sorted(p.name for p in (backends / "python").iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    environ = local.server_environment(layout, env, tmp_path)
    assert environ["PATH"].split(os.pathsep)[0] == str(env.python.parent)
    assert environ["LD_LIBRARY_PATH"].split(os.pathsep)[:2] == [env.libdir, str(layout.libs)]


def test_log_excerpt_keeps_lines_about_the_failed_models():
    log = "\n".join([
        "I1123 model_lifecycle.cc:472] \"loading: good:1\"",
        "E1123 server.cc:241] \"CudaDriverHelper has not been initialized.\"",
        "I1123 pb_stub.cc:366] \"Failed to initialize Python stub: /repo/bad/1/model.py(3)\"",
        "+-------+",
        "| bad   | 1 | UNAVAILABLE |",
        "E1123 model_lifecycle.cc:642] \"failed to load 'bad' version 1\"",
        "I1123 http_server.cc] \"Started HTTPService\"",
    ])
    assert log_excerpt(log, ("bad",), "x.log").splitlines() == [
        "log x.log, last 2 relevant line(s):",
        "  I1123 pb_stub.cc:366] \"Failed to initialize Python stub: /repo/bad/1/model.py(3)\"",
        "  E1123 model_lifecycle.cc:642] \"failed to load 'bad' version 1\"",
    ]


def test_compare_by_cosine_or_allclose():
    a = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert compare(a, a, {"atol": 0, "rtol": 0}) == ("", 0.0, pytest.approx(1.0))
    problem, max_abs, cosine = compare(a * 1.1, a, {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.999})
    assert problem == "" and max_abs == pytest.approx(0.3, rel=1e-5) and cosine == pytest.approx(1.0)
    problem, _, _ = compare(-a, a, {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.99})
    assert problem == "cosine -1.000000 < 0.99 (max diff = 6)"
    assert compare(a[:2], a, {"atol": 1, "rtol": 1})[0] == "shape (2,) differs from the reference's (3,)"


def test_unusable_references_fail_the_model_with_a_reason(tmp_path):
    (tmp_path / "shout").mkdir()
    save_reference(tmp_path / "shout" / "pickled.npz", {"TEXT": np.array([[b"a"]], dtype=np.object_)}, {})
    save_reference(tmp_path / "shout" / "partial.npz", {}, {"LOUD": np.array([[b"A"]])})
    path = tmp_path / "shout"
    assert [check_model(None, tmp_path, "shout", entry(SHOUT_SIG, ref)).message
            for ref in ("pickled.npz", "partial.npz", "absent.npz")] == [
        f"- reference {path / 'pickled.npz'}: Object arrays cannot be loaded when allow_pickle=False; "
        f"save text as fixed-width bytes (dtype 'S') arrays",
        f"- reference {path / 'partial.npz'}: no input TEXT",
        f"- reference {path / 'absent.npz'}: [Errno 2] No such file or directory: '{path / 'absent.npz'}'",
    ]


# --- docker ------------------------------------------------------------------------------------

def test_container_spec_is_exactly_this(tmp_path):
    from docker.types import DeviceRequest, Ulimit

    ports = {"http": 18000, "grpc": 18001, "metrics": 18002}
    spec = container_spec(Path("/data/repo"), image=DEFAULT_IMAGE, ports=ports)
    assert DEFAULT_IMAGE == "nvcr.io/nvidia/tritonserver:26.07-py3"  # builder.deploy.ngc.DEFAULT_TAG
    assert spec == {
        "image": "nvcr.io/nvidia/tritonserver:26.07-py3",
        "command": ["tritonserver", "--model-repository=/models", "--allow-gpu-metrics=false",
                    "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=10", "--log-verbose=0",
                    "--strict-readiness=true", "--exit-on-error=false"],
        "detach": True,
        "auto_remove": False,
        "volumes": {"/data/repo": {"bind": "/models", "mode": "ro"}},
        "ports": {"8000/tcp": ("127.0.0.1", 18000), "8001/tcp": ("127.0.0.1", 18001),
                  "8002/tcp": ("127.0.0.1", 18002)},
        "shm_size": "1g",
        "ulimits": [Ulimit(name="memlock", soft=-1, hard=-1), Ulimit(name="stack", soft=67108864, hard=67108864)],
        "labels": {"triton-builder": "1", "triton-builder.repository": "/data/repo"},
    }
    gpu = container_spec(Path("/data/repo"), image="img:tag", ports=ports, gpus=True)
    assert gpu["device_requests"] == [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    assert gpu["command"][2:4] == ["--allow-gpu-metrics=true", "--exit-timeout-secs=10"]
    assert {k: v for k, v in gpu.items() if k not in ("device_requests", "command", "image")} == {
        k: v for k, v in spec.items() if k not in ("command", "image")}


def test_container_spec_is_accepted_by_the_docker_sdk():
    # the SDK's own run() -> create() translation (private, but it rejects unknown or misspelled kwargs)
    from docker.models.containers import _create_container_args

    spec = container_spec(Path("/data/repo"), image="img", ports={"http": 1, "grpc": 2, "metrics": 3}, gpus=True)
    spec.pop("detach")  # consumed by run() itself
    args = _create_container_args({**spec, "version": "1.43"})
    assert args["host_config"]["Binds"] == ["/data/repo:/models:ro"]
    assert args["host_config"]["PortBindings"]["8000/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": "1"}]
    assert args["host_config"]["ShmSize"] == 1024 ** 3
    assert args["host_config"]["DeviceRequests"][0]["Capabilities"] == [["gpu"]]


def test_docker_without_an_engine_is_one_clear_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert docker_available() is False
    with pytest.raises(UserError) as info:
        start_server(tmp_path, "docker")
    message = str(info.value)
    assert message.startswith("docker runtime: no Docker engine answers (")
    assert message.endswith("); start Docker or use --runtime local") and "\n" not in message


class FakeContainer:
    id, short_id, status = "c0ffee" * 10, "c0ffee", "created"
    attrs = {"State": {"ExitCode": 1}}

    def __init__(self):
        self.calls = []

    def reload(self):
        self.status = "exited"

    def logs(self):
        return b"I1123 starting\nE1123 error: creating server: Invalid argument - --model-repository\n"

    def stop(self, timeout):
        self.calls.append(("stop", timeout))

    def remove(self, force):
        self.calls.append(("remove", force))


def test_docker_container_that_exits_is_removed_and_its_log_reported(tmp_path, monkeypatch):
    container = FakeContainer()
    runs = []

    class Client:
        class containers:
            @staticmethod
            def run(**spec):
                runs.append(spec)
                return container

    monkeypatch.setattr(docker_mod, "docker_client", lambda: Client)
    log = tmp_path / "docker.log"
    with pytest.raises(RunError) as info:
        start_server(tmp_path, "docker", image="img:1", log_path=log)
    assert runs[0]["image"] == "img:1" and runs[0]["volumes"] == {str(tmp_path): {"bind": "/models", "mode": "ro"}}
    assert str(info.value).splitlines() == [
        "tritonserver exited with code 1 before it was ready",
        f"log {log} (container c0ffee, img:1), last 2 relevant line(s):",
        "  I1123 starting",
        "  E1123 error: creating server: Invalid argument - --model-repository",
    ]
    assert container.calls == [("stop", 15), ("remove", True)]
    assert "Invalid argument" in log.read_text()
