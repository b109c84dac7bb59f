"""For real: Debian's Prometheus, with the scrape config and recording rules `deploy` writes (target
pointed at a local Triton's metrics port, short intervals), scrapes a running Triton while
perf_analyzer drives it; the recorded per-model throughput must agree with perf_analyzer's."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_perf_server import make_toy_repo  # noqa: E402

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _api(url: str, path: str, **params) -> dict:
    with OPENER.open(f"http://{url}{path}?{urllib.parse.urlencode(params)}", timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def _start_prometheus(config: Path, data: Path, url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
                             f"--web.listen-address={url}"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with OPENER.open(f"http://{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise AssertionError(f"prometheus not ready after 20 s:\n{log.read_text()[-2000:]}")


@pytest.mark.server
def test_prometheus_records_the_throughput_perf_analyzer_measures(tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus is not installed (make setup installs it when root)")
    from builder.deploy import DeployOptions, deploy
    from builder.perf.results import load_results
    from builder.perf.run import run_perf
    from builder.runtime import start_server
    from builder.runtime.ports import resolve_ports

    model = "toy_onnx_fp32"
    repo = make_toy_repo(tmp_path / "repo", {model: ("onnx", "fp32", 2.0, 1.0)})
    with start_server(repo) as server:
        out = tmp_path / "deploy"
        deploy(repo, out, DeployOptions(metrics_target=server.metrics_url, scrape_interval="1s", rate_window="4s"))
        prom_url = f"127.0.0.1:{resolve_ports('127.0.0.1', {'http': None})['http']}"
        prom = _start_prometheus(out / "prometheus" / "prometheus.yml", tmp_path / "tsdb", prom_url, tmp_path / "prom.log")
        try:
            t0 = time.time()
            results = run_perf(repo, server=server, concurrency=(2,), measurement_ms=4000, out=tmp_path / "results")
            t1 = time.time()
            time.sleep(2)  # the last evaluations of the rules
            targets = _api(prom_url, "/api/v1/targets")["activeTargets"]
            assert [t["health"] for t in targets] == ["up"], targets
            series = _api(prom_url, "/api/v1/query_range", query=f'model:nv_inference_count:rate{{model="{model}"}}',
                          start=t0, end=t1, step=1)["result"]
        finally:
            prom.terminate()
            prom.wait(timeout=20)
    (row,) = load_results(results)[0].itertuples()
    # the load is steady from the first window of the rate to the end of the run: compare the median
    values = [float(v) for ts, v in series[0]["values"] if t0 + 6 <= float(ts) <= t1 - 1]
    assert len(values) >= 5, series
    recorded = statistics.median(values)
    assert abs(recorded - row.throughput) <= 0.15 * row.throughput, (recorded, row.throughput, values)
