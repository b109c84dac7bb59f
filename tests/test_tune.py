"""`tune`: the preferred_batch_size rendering rule, the search, and a real search with --apply on a toy model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.perf import search
from builder.perf import tune as tuning
from builder.render import parse_config, preferred_batch_sizes
from test_perf_server import make_toy_repo


@pytest.mark.parametrize("sizes, mbs, rendered", [
    ([], 16, []),  # the default: none, the batcher forms the largest batch it can
    ([16], 16, []),  # says nothing beyond the default
    ([4, 8, 16], 16, [4, 8, 16]),  # asked for, and all formable: kept
    ([4, 8, 16], 8, [4, 8]),  # max_batch_size lowered under it (tune, Model Analyzer): never above it
    ([4, 8, 16], 4, []),  # what is left is [max_batch_size]: nothing to say
    ([8, 2, 2], 4, [2]),
])
def test_preferred_batch_size_is_rendered_only_where_it_can_help(sizes, mbs, rendered):
    assert preferred_batch_sizes(sizes, mbs) == rendered


TOY = """name: "m"
backend: "python"
max_batch_size: 16
input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 4 ] }
dynamic_batching { preferred_batch_size: [ 4, 8, 16 ] max_queue_delay_microseconds: 500 }
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "threads" value { string_value: "1" } }
"""


def test_every_candidate_config_parses_and_keeps_preferred_sizes_within_max_batch_size():
    cfg = parse_config(TOY)
    default = search.settings_of(cfg)
    assert default == search.Settings(1, 16, (4, 8, 16), 500)
    grid = search.grids(default, cores=2, min_batch=2)
    assert grid["max_batch_size"] == [2, 4, 8, 16] and grid["instances"] == [1, 2, 3, 4]
    seen = []

    def evaluate(s):
        text = search.config_text(search.with_settings(cfg, s), "m/config.pbtxt")
        back = parse_config(text)
        assert search.settings_of(back) == s.normal()
        assert all(b <= back.max_batch_size for b in back.dynamic_batching.preferred_batch_size)
        assert back.parameters["threads"].string_value == "1" and back.input[0].name == "x"
        seen.append(s)
        return 1.0

    search.search(default, grid, 6, evaluate)
    assert len(seen) == 6 and seen[0] == default and len(set(seen)) == 6


def test_search_finds_the_best_within_its_budget():
    default = search.Settings(1, 16, (), 100)
    grid = search.grids(default, cores=2)

    def score(s):  # best at 2 instances, delay 2000 µs, max batch 16; a dip elsewhere
        return 100 - 30 * abs(s.instances - 2) - 5 * abs(search.DELAY_STEPS_US.index(s.queue_delay_us) - 3) \
            - 3 * (16 // s.max_batch_size - 1)

    tried = search.search(default, grid, 10, score)
    assert len(tried) <= 10 and tried[0][0] == default
    best = max(tried, key=lambda p: p[1])[0]
    assert best == search.Settings(2, 16, (), 2000)
    # a failed candidate (no score) is never the centre of the refinement
    tried = search.search(default, grid, 5, lambda s: None if s != default else 1.0)
    assert len(tried) == 5


def test_a_gain_must_clear_the_defaults_own_spread():
    default, other = search.Settings(1, 8, (), 0), search.Settings(2, 8, (), 0)

    def runs(*pairs):
        return [tuning.Candidate(i, s, throughput=t, p99_ms=1.0, concurrency=4, fits=True) for i, (s, t) in enumerate(pairs)]

    # default 100 and 80 (25 % apart), the other 115 twice: +27.8 % over the mean 90, beyond the spread
    summary = tuning.summarize("m", runs((default, 100), (other, 115), (default, 80), (other, 115)), 50)
    assert summary["chosen"]["settings"]["instances"] == 2 and round(summary["gain_pct"], 1) == 27.8
    # the other at 110: +22 %, above 10 % but within the default's 25 % spread: the default stays
    summary = tuning.summarize("m", runs((default, 100), (other, 110), (default, 80), (other, 110)), 50)
    assert summary["chosen"] is summary["default"] and summary["noise_pct"] == 25.0
    assert "**Keep the default**" in tuning.markdown({**summary, "budget": 4, "concurrency": [4], "measurement_ms": 500,
                                                      "machine": {}})


def test_bad_arguments_are_one_line_errors(tmp_path):
    repo = make_toy_repo(tmp_path / "repo", {"toy_a": ("onnx", "fp32", 0.1, 1.0), "toy_b": ("onnx", "int8", 0.1, 1.0)})
    manifest = json.loads((repo / "triton-builder.json").read_text())
    manifest["models"]["toy_a"]["role"] = "ensemble"
    (repo / "triton-builder.json").write_text(json.dumps(manifest))
    cases = {
        ("--budget", "1"): "--budget 1: the search needs at least 2 runs (the default and one candidate)",
        ("--model", "nope"): "--model nope: not in",
        ("--model", "toy_a"): "--model toy_a: is an ensemble, not a variant; tune the variant it serves",
        ("--concurrency", "4,x"): "--concurrency '4,x': give integers separated by commas, e.g. 4,16",
        ("--latency-budget-ms", "0"): "--latency-budget-ms 0: give a positive p99 budget in ms",
    }
    for args, message in cases.items():
        result = CliRunner().invoke(app, ["tune", str(repo), *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert result.output.startswith(f"error: {message}"), result.output
    manifest["models"]["toy_a"]["role"] = "variant"
    (repo / "triton-builder.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["tune", str(repo), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "2 tunable variants; name one with --model" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.server
def test_tune_applies_the_best_and_the_server_serves_it(tmp_path):
    from builder.perf.results import load_results
    from builder.perf.run import run_perf
    from builder.runtime import start_server
    from builder.validate import validate_repository

    # 4 ms of sleep per request, one request at a time per instance: a second instance doubles throughput
    repo = make_toy_repo(tmp_path / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 4.0, 1.0)})
    before = (repo / "toy_onnx_fp32" / "config.pbtxt").read_text()
    out = tmp_path / "tune"
    result = CliRunner().invoke(app, ["tune", str(repo), "--budget", "4", "--concurrency", "4", "--measurement-ms", "500",
                                      "--latency-budget-ms", "1000", "--out", str(out), "--apply"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "tune.json").read_text())
    runs = [c["settings"]["instances"] for c in summary["candidates"]]
    assert runs == [1, 2, 1, 2], summary  # the default, one candidate; then both once more
    assert [o["runs"] for o in summary["configurations"]] == [[0, 2], [1, 3]]
    assert all(c["fits"] and c["throughput"] > 0 for c in summary["candidates"]), summary
    assert "| 0 (default) |" in (out / "tune.md").read_text()
    chosen = summary["chosen"]
    assert chosen["settings"]["instances"] > 1, summary  # more instances beat one on a sleeping model
    assert summary["gain_pct"] > 20, summary

    cfg = parse_config((repo / "toy_onnx_fp32" / "config.pbtxt").read_text())
    assert (repo / "toy_onnx_fp32" / "config.pbtxt").read_text() != before
    assert search.settings_of(cfg) == search.Settings(**{**chosen["settings"], "preferred": ()})
    assert cfg.parameters["delay_ms"].string_value == "4.0"  # everything else kept
    entry = json.loads((repo / "triton-builder.json").read_text())["models"]["toy_onnx_fp32"]
    assert entry["tuned"]["label"] == chosen["label"]
    assert validate_repository(repo) == 1
    with start_server(repo) as server:  # the server loads it, and it is measured again
        again = run_perf(repo, server=server, concurrency=(4,), measurement_ms=500, out=tmp_path / "again")
    row = load_results(again)[0].iloc[0]
    assert row["throughput"] > summary["default"]["throughput"] * 1.2


def test_apply_leaves_nothing_changed_when_validation_fails(tmp_path, monkeypatch):
    import builder.validate

    repo = make_toy_repo(tmp_path / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 1.0, 1.0)})
    cfg_path, manifest_path = repo / "toy_onnx_fp32" / "config.pbtxt", repo / "triton-builder.json"
    before = cfg_path.read_bytes(), manifest_path.read_bytes()
    settings = {"instances": 2, "max_batch_size": 4, "preferred": [], "queue_delay_us": 100}
    summary = {"variant": "toy_onnx_fp32", "gain_pct": 50.0, "finished": None,
               "chosen": {"settings": settings, "label": "x", "throughput": 1.0, "p99_ms": 1.0, "concurrency": 4}}

    def broken(repo):
        from builder.errors import UserError

        raise UserError("broken on purpose")

    monkeypatch.setattr(builder.validate, "validate_repository", broken)
    with pytest.raises(Exception, match="broken on purpose"):
        tuning.apply_tuned(repo, summary)
    assert (cfg_path.read_bytes(), manifest_path.read_bytes()) == before
    assert sorted(p.name for p in (repo / "toy_onnx_fp32").iterdir()) == ["1", "config.pbtxt"]
    monkeypatch.undo()
    tuning.apply_tuned(repo, summary)  # and with a sound repository it writes both
    cfg = parse_config(cfg_path.read_text())
    assert (cfg.instance_group[0].count, cfg.max_batch_size, cfg.dynamic_batching.max_queue_delay_microseconds) == (2, 4, 100)
    assert json.loads(manifest_path.read_text())["models"]["toy_onnx_fp32"]["signature"]["max_batch_size"] == 4


def test_report_shows_the_tuned_configuration_of_the_best_variant(tmp_path):
    import shutil

    from builder.perf.report import write_report

    results = tmp_path / "results"
    shutil.copytree(Path(__file__).parent / "fixtures" / "compare" / "base", results)
    runs = [tuning.Candidate(0, search.Settings(1, 8, (), 0), 100.0, 5.0, 4, True),
            tuning.Candidate(1, search.Settings(2, 8, (), 0), 150.0, 6.0, 4, True)]
    summary = {**tuning.summarize("toy_a", runs, 50), "budget": 2}
    (results / "tune.json").write_text(json.dumps(summary, default=str))
    text = write_report(results).read_text()
    assert ("**With its best serving configuration** (`tune.json`): toy_a with 2 instances, max batch 8, preferred none, "
            "delay 0 µs serves 150.0 infer/s at p99 6.00 ms (concurrency 4), +50.0 % over its default") in text
