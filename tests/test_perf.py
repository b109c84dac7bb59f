"""builder.perf without a server: flags, CSV parsing (recorded fixtures), retries (a fake
perf_analyzer), input data, the results table, run_perf's bookkeeping and the report."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from builder.errors import RunError, UserError
from builder.perf.analyzer import (
    PerfFlags,
    cuda_runtime_lib_dir,
    find_perf_analyzer,
    measure,
    parse_csv,
    perf_env,
    plan_ranges,
)
from builder.perf.inputs import input_data, write_input_data
from builder.perf.results import (
    COLUMNS,
    LevelResult,
    level_row,
    load_results,
    parquet_available,
    save_results,
    to_frame,
)
from builder.signature import Signature, TensorSpec

FIXTURES = Path(__file__).parent / "fixtures" / "perf"


# --------------------------------------------------------------------------- flags

def test_flags_render_an_argv_list():
    flags = PerfFlags(model="bert_onnx_fp16", url="127.0.0.1:8001", concurrency=(1, 16, 5), measurement_ms=1000,
                      input_data="/data/in.json", batch_size=4, percentile=95, shapes=(("input_ids", (16,)),))
    assert flags.argv("/bin/pa") == [
        "/bin/pa", "-m", "bert_onnx_fp16", "-u", "127.0.0.1:8001", "-i", "grpc",
        "--concurrency-range", "1:16:5", "-p", "1000", "-s", "25", "-r", "10", "-b", "4", "-f", "perf.csv",
        "--input-data", "/data/in.json", "--percentile", "95", "--shape", "input_ids:16", "--verbose-csv",
    ]
    assert flags.levels == (1, 6, 11, 16)


def test_flags_report_every_problem_at_once():
    with pytest.raises(UserError) as err:
        PerfFlags(model="m", url="localhost", protocol="tcp", concurrency=(4, 2, 1), max_trials=2,
                  csv_file="/abs/out.csv", percentile=100)
    assert str(err.value) == (
        "perf_analyzer flags: url (-u) 'localhost' must be host:port; protocol (-i) 'tcp' must be one of grpc, http; "
        "concurrency 4:2:1 needs 1 <= start <= end and step >= 1; "
        "max_trials (-r) 2 must be >= 3 (stability needs 3 windows); percentile 100 must be in [1, 99]; "
        "csv_file (-f) '/abs/out.csv' must be a bare file name (it is written in the working directory)"
    )


@pytest.mark.parametrize("kwargs, text", [
    ({"measurement_ms": 50}, "measurement_ms (-p) 50 must be >= 100"),
    ({"batch_size": 0}, "batch_size (-b) 0 must be >= 1"),
    ({"stability_pct": 0}, "stability_pct (-s) 0 must be in (0, 1000]"),
    ({"shapes": (("ids", (0,)),)}, "shape 'ids': (0,) must be a name and positive dims"),
])
def test_flags_validation(kwargs, text):
    with pytest.raises(UserError, match=r"^perf_analyzer flags: " + text.replace("(", r"\(").replace(")", r"\)")):
        PerfFlags(model="m", url="h:1", **kwargs)


def test_flags_are_frozen_values():
    flags = PerfFlags(model="m", url="h:1", concurrency=[2, 2, 1])
    assert flags.concurrency == (2, 2, 1)
    with pytest.raises(AttributeError):
        flags.model = "other"


@pytest.mark.parametrize("levels, ranges", [
    ((1, 4, 16), [(1, 4, 3), (16, 16, 1)]),
    ((4, 3, 2, 1), [(1, 4, 1)]),
    ((1, 2, 4, 8), [(1, 2, 1), (4, 8, 4)]),
    ((8,), [(8, 8, 1)]),
])
def test_plan_ranges(levels, ranges):
    assert plan_ranges(levels) == ranges


def test_finding_the_binary_and_its_environment(tmp_path):
    found = find_perf_analyzer()
    assert found.name == "perf_analyzer" and os.access(found, os.X_OK)
    not_exec = tmp_path / "perf_analyzer"
    not_exec.write_text("")
    with pytest.raises(UserError, match="is not an executable file"):
        find_perf_analyzer(not_exec)
    # a console-script wrapper on PATH (the perf-analyzer wheel's): the binary it would run is taken instead,
    # so that the SIGINT at a time limit reaches perf_analyzer itself and it prints what it measured
    wrapper = tmp_path / "bin" / "perf_analyzer"
    wrapper.parent.mkdir()
    wrapper.write_text("#!/usr/bin/env python3\nimport sys\n")
    wrapper.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
        chosen = find_perf_analyzer()
    assert chosen != wrapper and chosen.read_bytes()[:4] == b"\x7fELF"
    lib = cuda_runtime_lib_dir()
    assert lib is not None and (lib / "libcudart.so.12").exists()
    env = perf_env({"LD_LIBRARY_PATH": "/x"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [str(lib), "/x"]


# --------------------------------------------------------------------------- CSV (recorded fixtures)

def test_parse_recorded_verbose_csv():
    (row,) = parse_csv(FIXTURES / "pa_verbose_c1.csv")
    assert row == {"concurrency": 1, "throughput": 645.423, "client_send_us": 2.0, "network_us": 142.0,
                   "server_queue_us": 42.0, "server_compute_input_us": 11.0, "server_compute_infer_us": 1236.0,
                   "server_compute_output_us": 105.0, "client_recv_us": 1.0, "p50_us": 1494.0, "p90_us": 1587.0,
                   "p95_us": 1657.0, "p99_us": 2139.0, "avg_us": 1541.0}


def test_parse_recorded_plain_csv_has_no_average():
    rows = parse_csv(FIXTURES / "pa_plain_sweep.csv")
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert "avg_us" not in rows[0] and rows[1]["p99_us"] == 2737.0


def test_recorded_sweep_silently_misses_levels():
    rows = parse_csv(FIXTURES / "pa_sweep_missing_levels.csv")
    assert [r["concurrency"] for r in rows] == [1, 2]  # asked for 1..6, exit code was 0
    assert "Failed to obtain stable measurement" in (FIXTURES / "pa_sweep_missing_levels.stderr.txt").read_text()


def test_parse_rejects_other_csv(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("Request Rate,Inferences/Second\n1,2\n")
    with pytest.raises(RunError, match="missing columns Concurrency, p50 latency, p99 latency"):
        parse_csv(path)


# --------------------------------------------------------------------------- retries (fake perf_analyzer)

FAKE = textwrap.dedent('''
    """A stand-in for perf_analyzer: behaves as the real one was seen to (see fixtures/perf/README.md)."""
    import json, os, sys
    argv = sys.argv[1:]
    opt = lambda flag: argv[argv.index(flag) + 1]
    scenario = json.loads(os.environ.get("FAKE_PA", "{}"))
    with open(os.environ["FAKE_PA_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\\n")
    model = opt("-m")
    if model in scenario.get("fail", []):
        sys.stderr.write("error: failed to get model metadata: Request for unknown model: '%s'\\n" % model)
        sys.exit(99)
    start, end, step = (int(x) for x in opt("--concurrency-range").split(":"))
    window, pct = int(opt("-p")), float(opt("-s"))
    header, line = open(os.environ["FAKE_PA_ROW"]).read().splitlines()[:2]
    rows = []
    for level in range(start, end + 1, step):
        need = scenario.get("unstable_below_ms", {}).get(str(level), 0)
        never = level in scenario.get("never", []) and pct < 100
        if window < need or never:
            sys.stderr.write("Failed to obtain stable measurement within 10 measurement windows for "
                             "concurrency %d. Please try to increase the --measurement-interval.\\n" % level)
            break
        cells = line.split(",")
        cells[0], cells[1] = str(level), str(100.0 * level)
        rows.append(",".join(cells))
    if rows:
        open(opt("-f"), "w").write("\\n".join([header, *rows]) + "\\n")
    sys.exit(0 if rows else 2)
''')


@pytest.fixture
def fake_pa(tmp_path, monkeypatch):
    path = tmp_path / "fake_perf_analyzer"
    path.write_text(f"#!{sys.executable}\n" + FAKE)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "fake_calls.jsonl"
    monkeypatch.setenv("FAKE_PA_LOG", str(log))
    monkeypatch.setenv("FAKE_PA_ROW", str(FIXTURES / "pa_verbose_c1.csv"))

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    class Fake(type(path)):  # a Path that also reports the argv of every call
        pass

    fake = Fake(path)
    fake.calls = calls
    return fake


def _scenario(monkeypatch, **scenario):
    monkeypatch.setenv("FAKE_PA", json.dumps(scenario))


def test_measure_retries_a_missing_level_with_a_longer_window(fake_pa, tmp_path, monkeypatch):
    _scenario(monkeypatch, unstable_below_ms={"4": 2000})
    flags = PerfFlags(model="m", url="h:1", measurement_ms=1000)
    m = measure(flags, (1, 4), tmp_path / "raw", binary=fake_pa, env=dict(os.environ))
    assert [(lv.concurrency, lv.status, lv.stable, lv.attempts) for lv in m.levels] == [(1, "ok", True, 1), (4, "ok", True, 2)]
    windows = [(c[c.index("--concurrency-range") + 1], c[c.index("-p") + 1], c[c.index("-r") + 1]) for c in fake_pa.calls()]
    assert windows == [("1:1:1", "1000", "10"), ("4:4:1", "1000", "10"), ("4:4:1", "2000", "15")]
    assert m.levels[1].values["throughput"] == 400.0 and m.complete
    assert (tmp_path / "raw" / "c4_a2" / "command.txt").read_text().startswith(str(fake_pa))


def test_measure_sweep_rechecks_one_row_per_level(fake_pa, tmp_path, monkeypatch):
    _scenario(monkeypatch, unstable_below_ms={"2": 2000})  # the sweep exits 0 with level 1 only
    m = measure(PerfFlags(model="m", url="h:1", measurement_ms=1000), (1, 2, 3), tmp_path / "raw",
                binary=fake_pa, env=dict(os.environ), sweep=True)
    assert [(lv.concurrency, lv.status, lv.attempts) for lv in m.levels] == [(1, "ok", 1), (2, "ok", 2), (3, "ok", 2)]
    assert [c[c.index("--concurrency-range") + 1] for c in fake_pa.calls()] == ["1:3:1", "2:2:1", "3:3:1"]


def test_measure_keeps_a_never_stable_level_flagged(fake_pa, tmp_path, monkeypatch):
    _scenario(monkeypatch, never=[2])
    seen = []
    m = measure(PerfFlags(model="m", url="h:1", measurement_ms=500), (1, 2), tmp_path / "raw", binary=fake_pa,
                env=dict(os.environ), max_attempts=3, on_level=seen.append)
    level = m.levels[1]
    assert (level.status, level.stable, level.attempts) == ("unstable", False, 4)  # 3 tries + the relaxed one
    assert level.values["throughput"] == 200.0
    assert [c[c.index("-s") + 1] for c in fake_pa.calls()][-1] == "100"
    assert [lv.concurrency for lv in seen] == [1, 2]

    m = measure(PerfFlags(model="m", url="h:1", measurement_ms=500), (2,), tmp_path / "raw2", binary=fake_pa,
                env=dict(os.environ), max_attempts=2, relaxed_stability_pct=None)
    assert [(lv.status, lv.stable, lv.attempts, lv.values) for lv in m.levels] == [("missing", False, 2, {})]
    assert not m.complete


def test_measure_failure_raises_with_the_levels_so_far(fake_pa, tmp_path, monkeypatch):
    from builder.perf.analyzer import PerfAnalyzerError

    _scenario(monkeypatch, fail=["gone"])
    with pytest.raises(PerfAnalyzerError) as err:
        measure(PerfFlags(model="gone", url="h:1"), (1, 2), tmp_path / "raw", binary=fake_pa, env=dict(os.environ))
    assert isinstance(err.value, RunError)
    assert "perf_analyzer -m gone failed (exit 99)" in str(err.value)
    assert "Request for unknown model: 'gone'" in str(err.value)
    assert [(lv.concurrency, lv.status) for lv in err.value.levels] == [(1, "failed"), (2, "not_run")]


# --------------------------------------------------------------------------- input data

TEXT_SIG = Signature(
    inputs=(TensorSpec("input_ids", "int64", (-1,), kind="token_ids", high=30522, opt_dims=(12,)),
            TensorSpec("attention_mask", "int64", (-1,), kind="attention_mask", opt_dims=(12,)),
            TensorSpec("token_type_ids", "int64", (-1,), kind="token_type_ids", opt_dims=(12,))),
    outputs=(TensorSpec("embedding", "float32", (384,)),),
    max_batch_size=8,
)


def test_input_data_is_valid_for_the_signature(tmp_path):
    path = write_input_data(TEXT_SIG, tmp_path / "in.json", entries=5)
    data = json.loads(path.read_text())
    assert list(data) == ["data"] and len(data["data"]) == 5
    for entry in data["data"]:
        assert set(entry) == {"input_ids", "attention_mask", "token_type_ids"}
        ids = entry["input_ids"]
        assert ids["shape"] == [12] and len(ids["content"]) == 12  # no batch dimension
        assert all(isinstance(v, int) and 1 <= v < 30522 for v in ids["content"])
        assert entry["attention_mask"]["content"] == [1] * 12
        assert entry["token_type_ids"]["content"] == [0] * 12
    assert len({tuple(e["input_ids"]["content"]) for e in data["data"]}) == 5  # distinct requests


def test_input_data_for_text_and_unbatched_models():
    sig = Signature(inputs=(TensorSpec("TEXT", "bytes", (-1,), kind="text", opt_dims=(1,)),
                            TensorSpec("pixel_values", "float16", (3, 2, 2), kind="pixels")),
                    outputs=(TensorSpec("LEN", "int64", (-1,)),), max_batch_size=0)
    data = input_data(sig, entries=3)["data"]
    texts = [e["TEXT"]["content"] for e in data]
    assert all(isinstance(t, list) and len(t) == 1 and isinstance(t[0], str) for t in texts)
    assert len({t[0] for t in texts}) == 3
    assert data[0]["pixel_values"]["shape"] == [3, 2, 2] and len(data[0]["pixel_values"]["content"]) == 12
    json.dumps(data, ensure_ascii=False)


def test_input_data_shapes_override_and_errors():
    data = input_data(TEXT_SIG, entries=1, shapes={"input_ids": (4,), "attention_mask": (4,), "token_type_ids": (4,)})
    assert data["data"][0]["input_ids"]["shape"] == [4]
    image = Signature(inputs=(TensorSpec("IMAGE", "uint8", (-1,), kind="image"),), outputs=())
    with pytest.raises(UserError, match="perf input data: tensor IMAGE: encoded images"):
        input_data(image)
    with pytest.raises(UserError, match="input entries 0 must be >= 1"):
        input_data(TEXT_SIG, entries=0)


# --------------------------------------------------------------------------- results table

def test_level_rows_become_a_tidy_table_in_ms(tmp_path):
    (values,) = parse_csv(FIXTURES / "pa_verbose_c1.csv")
    args = dict(run="r1", model="toy", variant="toy_onnx_fp32", format="onnx", precision="fp32", batch_size=1)
    rows = [level_row(LevelResult(1, values, True, 1, "ok"), **args),
            level_row(LevelResult(4, {}, False, 3, "missing"), **args)]
    table = to_frame(rows)
    assert list(table.columns) == COLUMNS
    first = table.iloc[0]
    assert first["throughput"] == 645.423 and first["p99_ms"] == 2.139 and first["avg_ms"] == 1.541
    assert first["server_compute_infer_ms"] == 1.236 and first["network_ms"] == 0.142
    assert np.isnan(table.iloc[1]["p99_ms"]) and table.iloc[1]["status"] == "missing"
    save_results(tmp_path, table, {"run": "r1", "complete": False})
    loaded, manifest = load_results(tmp_path)
    assert manifest == {"run": "r1", "complete": False}
    assert list(loaded["stable"]) == [True, False]
    pd.testing.assert_frame_equal(loaded, table, check_dtype=False)
    assert (tmp_path / "results.parquet").exists() == parquet_available()  # pyarrow is not a dependency


def test_load_results_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="no results.csv here"):
        load_results(tmp_path)


# --------------------------------------------------------------------------- run_perf bookkeeping

class _GivenServer:
    grpc_url = "127.0.0.1:1"
    http_url = None


def _toy_repo(tmp_path):
    from test_perf_server import make_toy_repo

    return make_toy_repo(tmp_path / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 1.0, 1.0),
                                             "toy_onnx_int8": ("onnx", "int8", 0.2, 0.9991),
                                             "toy_torch_fp32": ("torch", "fp32", 2.0, 1.0)})


def test_run_perf_selection_errors(tmp_path):
    from builder.manifest import MANIFEST
    from builder.perf.run import run_perf

    repo = _toy_repo(tmp_path)
    with pytest.raises(UserError) as err:
        run_perf(repo, server=_GivenServer(), models=["toy_onnx_fp16", "toy_onnx_int8"])
    assert str(err.value) == ("unknown model(s) toy_onnx_fp16; this repository has: "
                              "toy_onnx_fp32, toy_onnx_int8, toy_torch_fp32")
    with pytest.raises(UserError, match="batch size 16 exceeds its max_batch_size 8"):
        run_perf(repo, server=_GivenServer(), batch_size=16)
    manifest = json.loads((repo / MANIFEST).read_text())
    manifest["models"]["toy_onnx_int8"]["status"] = "failed"
    (repo / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="model.s. toy_onnx_int8 did not pass verification"):
        run_perf(repo, server=_GivenServer(), models=["toy_onnx_int8"])
    with pytest.raises(UserError, match="no triton-builder.json here"):
        run_perf(tmp_path, server=_GivenServer())


def test_run_perf_keeps_partial_results_when_perf_analyzer_fails(fake_pa, tmp_path, monkeypatch):
    from builder.perf.run import run_perf

    _scenario(monkeypatch, fail=["toy_onnx_int8"], never=[4])
    repo = _toy_repo(tmp_path)
    out = tmp_path / "results"
    with pytest.raises(RunError) as err:
        run_perf(repo, server=_GivenServer(), concurrency=(1, 4), out=out, perf_analyzer=fake_pa,
                 measurement_ms=100, max_attempts=2)
    assert "perf_analyzer -m toy_onnx_int8 failed (exit 99)" in str(err.value)
    assert f"partial results kept in {out} (marked incomplete)" in str(err.value)
    table, manifest = load_results(out)
    assert manifest["complete"] is False and manifest["errors"]
    got = {(r.variant, r.concurrency): (r.status, r.stable, r.attempts) for r in table.itertuples()}
    assert got == {
        ("toy_onnx_fp32", 1): ("ok", True, 1), ("toy_onnx_fp32", 4): ("unstable", False, 3),
        ("toy_onnx_int8", 1): ("failed", False, 1), ("toy_onnx_int8", 4): ("not_run", False, 0),
        ("toy_torch_fp32", 1): ("not_run", False, 0), ("toy_torch_fp32", 4): ("not_run", False, 0),
    }
    assert manifest["variants"]["toy_onnx_int8"]["verification"]["outputs"]["embedding"]["cosine"] == 0.9991
    assert len(manifest["commands"]) == 5 and all("--input-data" in c["command"] for c in manifest["commands"])
    inputs = json.loads((out / "inputs" / "toy_onnx_fp32.json").read_text())
    assert all(1 <= v < 100 for e in inputs["data"] for v in e["input_ids"]["content"])
    report = __import__("builder.perf.report", fromlist=["write_report"]).write_report(out).read_text()
    assert "**Incomplete run.**" in report
    assert "toy_onnx_fp32 at concurrency 4 (unstable)" in report and "toy_torch_fp32 at concurrency 1 (not_run)" in report


def test_run_perf_keep_going_measures_the_variants_after_a_failure(fake_pa, tmp_path, monkeypatch):
    """keep_going (the GPU bench; `perf --keep-going`): a level that perf_analyzer fails on (a timeout at
    high concurrency) does not drop every variant after it, while the server answers."""
    import builder.perf.run as run

    _scenario(monkeypatch, fail=["toy_onnx_int8"], never=[4])
    monkeypatch.setattr(run, "_answers", lambda url: True)
    repo = _toy_repo(tmp_path)
    out = tmp_path / "results"
    with pytest.raises(RunError) as err:
        run.run_perf(repo, server=_GivenServer(), concurrency=(1, 4), out=out, perf_analyzer=fake_pa,
                     measurement_ms=100, max_attempts=2, keep_going=True)
    assert "perf_analyzer -m toy_onnx_int8 failed (exit 99)" in str(err.value)
    table, manifest = load_results(out)
    got = {(r.variant, r.concurrency): r.status for r in table.itertuples()}
    assert got == {("toy_onnx_fp32", 1): "ok", ("toy_onnx_fp32", 4): "unstable", ("toy_onnx_int8", 1): "failed",
                   ("toy_onnx_int8", 4): "not_run", ("toy_torch_fp32", 1): "ok", ("toy_torch_fp32", 4): "unstable"}
    assert manifest["complete"] is False


def test_perf_cli_passes_keep_going(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import builder.perf
    from builder.cli import app

    seen = {}
    monkeypatch.setattr(builder.perf, "run_perf", lambda repo, **kw: seen.update(kw) or tmp_path)
    for args, want in (([], False), (["--keep-going"], True)):
        result = CliRunner().invoke(app, ["perf", str(tmp_path), "--url", "127.0.0.1:1", *args])
        assert result.exit_code == 0, result.output
        assert seen["keep_going"] is want
    for args, want in (([], None), (["--temperature", "0.7"], {"temperature": 0.7}),
                       (["--temperature", "0.7", "--top-p", "0.9"], {"temperature": 0.7, "top_p": 0.9})):
        assert CliRunner().invoke(app, ["perf", str(tmp_path), "--url", "127.0.0.1:1", *args]).exit_code == 0
        assert seen["sampling"] == want
    bad = CliRunner().invoke(app, ["perf", str(tmp_path), "--url", "127.0.0.1:1", "--top-p", "1.5"])
    assert bad.exit_code == 2 and "top-p in (0, 1]" in bad.output and "Traceback" not in bad.output


# --------------------------------------------------------------------------- report (recorded run)

@pytest.fixture
def recorded_run(tmp_path):
    out = tmp_path / "run_toy"
    shutil.copytree(FIXTURES / "run_toy", out)
    return out


def test_report_picks_the_fastest_within_budget(recorded_run):
    from builder.perf.report import write_report

    text = write_report(recorded_run, latency_budget_ms=10).read_text()
    assert ("**toy_onnx_int8** is the best choice: the highest stable throughput (1794.8 infer/s at concurrency 4) "
            "with p99 7.51 ms within the 10 ms budget and min cosine 0.999100 among 3 variants that fit.") in text
    assert "Baseline: toy_onnx_fp32 (fp32, measured in this run)." in text
    # distances to the best: throughput ratio, p99 difference, accuracy
    assert "| toy_onnx_fp32 | onnx | fp32 | 4 | 768.6 | 0.43× | 6.92 | -0.60 | 1.00× | 1.000000 |" in text
    assert "| toy_torch_fp32 | torch | fp32 | 1 | 344.0 | 0.19× | 6.69 | -0.82 | 0.53× | 1.000000 |" in text
    assert "| toy_onnx_int8 | 16 | 1811.1 |" in text and "2.51×" in text
    assert "Incomplete" not in text and "flagged" not in text
    for png in ("toy_throughput_vs_p99.png", "toy_latency_breakdown.png", "toy_speedup.png"):
        assert (recorded_run / png).stat().st_size > 10_000
        assert f"]({png})" in text


def test_report_accuracy_budget_and_no_fit(recorded_run):
    from builder.perf.report import write_report

    text = write_report(recorded_run, latency_budget_ms=10, accuracy_budget=0.9999).read_text()
    assert "**toy_onnx_fp32** is the best choice" in text
    assert "cosine 0.999100 is below the 0.9999 accuracy budget" in text
    text = write_report(recorded_run, latency_budget_ms=1).read_text()
    assert ("**No variant of toy fits the budget** (p99 ≤ 1 ms, no accuracy budget): "
            "toy_onnx_fp32: p99 2.14 ms at best exceeds the 1 ms budget; "
            "toy_onnx_int8: p99 4.48 ms at best exceeds the 1 ms budget; "
            "toy_torch_fp32: p99 6.69 ms at best exceeds the 1 ms budget.") in text


def test_report_baseline_choice(recorded_run):
    from builder.perf.report import write_report
    from builder.perf.select import choose_baseline

    variants = json.loads((recorded_run / "manifest.json").read_text())["variants"]
    assert choose_baseline(variants) == "toy_onnx_fp32"
    assert choose_baseline(variants, "torch") == "toy_torch_fp32"
    assert choose_baseline(variants, "toy_onnx_int8") == "toy_onnx_int8"
    assert choose_baseline(variants, "other_model_onnx_fp32") == "toy_onnx_fp32"
    assert choose_baseline({k: v for k, v in variants.items() if v["precision"] != "fp32"}) is None
    text = write_report(recorded_run, baseline="torch").read_text()
    assert "Baseline: toy_torch_fp32" in text and "speedup vs toy_torch_fp32" in text
    with pytest.raises(UserError, match="baseline 'tensorrt' is neither a measured variant"):
        write_report(recorded_run, baseline="tensorrt")


def test_unstable_rows_are_flagged_and_never_best(recorded_run):
    from builder.perf.report import write_report

    table = pd.read_csv(recorded_run / "results.csv")
    table.loc[table["variant"] == "toy_onnx_int8", ["stable", "status", "attempts"]] = [False, "unstable", 4]
    table.to_csv(recorded_run / "results.csv", index=False)
    text = write_report(recorded_run).read_text()
    assert "> **3 measurement(s) flagged:** toy_onnx_int8 at concurrency 1 (unstable)" in text
    assert "**toy_onnx_fp32** is the best choice: the highest stable throughput (768.6 infer/s at concurrency 4)" in text
    assert "| toy_onnx_int8 | 16 | 1811.1 |" in text and "⚠ unstable |" in text
    assert "no stable measurement" in text


def test_llm_timeline_finds_the_windows_and_gaps_where_tokens_stopped():
    """perf/llm_timeline.py: output tokens per window (counts in responses are cumulative, as our endpoint sends
    them) and the longest gaps per token, from a perf_analyzer profile export."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("llm_timeline", Path(__file__).resolve().parents[1] / "perf" / "llm_timeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ms = 1_000_000
    request = lambda start, stamps, counts: {  # noqa: E731
        "timestamp": start * ms, "response_timestamps": [t * ms for t in stamps],
        "response_outputs": [{"num_output_tokens": c} for c in counts]}
    export = {"experiments": [{"requests": [request(0, [2, 4, 6, 36], [1, 3, 5, 7]),  # a 30 ms stall for 2 tokens
                                            request(1, [5, 15], [1, 2])]}]}
    rates, gaps = module.timeline(export, window_ms=10)
    assert rates == [600.0, 100.0, 0.0, 200.0]  # 6 tokens in 0-10 ms, 1 in 10-20, none in 20-30, 2 in 30-40
    assert gaps[0] == (15.0, 36) and gaps[1] == (10.0, 15)


HANGING_PA = textwrap.dedent('''
    import signal, sys, time
    print("*** Measurement Settings ***", flush=True)
    print("Request concurrency: 128", flush=True)
    interrupts = []
    def on_int(signum, frame):
        interrupts.append(signum)
        print(f"Interrupt signal ({signum}) received.", flush=True)
        if len(interrupts) == 2:  # as perf_analyzer: the second one exits at once
            print("Exiting immediately...", flush=True)
            sys.exit(0)
    signal.signal(signal.SIGINT, on_int)
    while True:  # a server that stopped answering: the requests in flight never complete
        time.sleep(0.05)
''')


def test_a_perf_analyzer_past_its_limit_is_interrupted_and_its_output_kept(tmp_path, monkeypatch):
    """Run 11: perf_analyzer timed out on a stalled model and everything it printed was lost. Now it gets SIGINT
    (it stops and reports), a second one if it still waits (it exits), and what it printed is kept."""
    import builder.perf.analyzer as pa

    fake = tmp_path / "perf_analyzer"
    fake.write_text(f"#!{sys.executable}\n" + HANGING_PA)
    fake.chmod(0o755)
    monkeypatch.setattr(pa, "INTERRUPT_WAIT_S", (0.5, 5.0))
    flags = pa.PerfFlags(model="clip_image", url="127.0.0.1:1", concurrency=(128, 128, 1))
    with pytest.raises(pa.PerfAnalyzerError) as err:
        pa.run_once(flags, tmp_path / "c128", binary=fake, timeout_s=1.0)
    assert str(err.value).startswith("perf_analyzer -m clip_image timed out after 1 s (interrupted")
    kept = (tmp_path / "c128" / "stdout.txt").read_text()
    assert "Request concurrency: 128" in kept and kept.count("Interrupt signal (2) received.") == 2
    assert "Exiting immediately..." in str(err.value)
