"""`triton-builder compare`: the regression gate, on recorded real results (tests/fixtures/compare/,
see its README) and on a real server run with a planted regression."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.perf.compare import compare_runs

RECORDED = Path(__file__).parent / "fixtures" / "compare"


def run_compare(base: Path, new: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["compare", str(base), str(new), "--out", str(out), *extra])


def verdicts(out: Path) -> dict[tuple[str, int], str]:
    table = pd.read_csv(out / "compare.csv")
    return {(r["variant"], int(r["concurrency"])): r["verdict"] for _, r in table.iterrows()}


def test_two_runs_of_the_same_repository_are_not_flagged(tmp_path):
    result = run_compare(RECORDED / "base", RECORDED / "same", tmp_path)
    assert result.exit_code == 0, result.output
    assert "**No regression.**" in result.output
    assert set(verdicts(tmp_path).values()) == {"same"}
    assert (tmp_path / "compare.png").stat().st_size > 0 and (tmp_path / "compare.md").is_file()
    # both directories hold 3 repeats: the medians are compared and the band names its source
    assert "| toy_a | 1 | 592.7 → 594.5 (+0.3 % ±50) |" in result.output
    assert "3 repeats" in result.output


def test_planted_regression_exits_1_and_names_it(tmp_path):
    result = run_compare(RECORDED / "base", RECORDED / "regressed", tmp_path)
    assert result.exit_code == 1, result.output
    assert verdicts(tmp_path) == {("toy_a", 1): "regressed", ("toy_a", 4): "regressed",
                                  ("toy_b", 1): "same", ("toy_b", 4): "same"}
    assert "**2 regression(s)**" in result.output
    assert "592.7 → 241.7 (-59.2 % ±50) ✗" in result.output
    # p99 of a run without repeats has no band: shown, not judged
    assert "1.72 → 5.72 (+233.3 % ±?)" in result.output


def test_the_other_way_round_is_an_improvement(tmp_path):
    result = run_compare(RECORDED / "regressed", RECORDED / "base", tmp_path)
    assert result.exit_code == 0, result.output
    assert verdicts(tmp_path)[("toy_a", 1)] == "improved"
    assert "+145.3 % ±50) ✓" in result.output


def test_missing_levels_and_variants_are_listed_not_compared(tmp_path):
    result = run_compare(RECORDED / "base", RECORDED / "partial", tmp_path)
    assert result.exit_code == 0, result.output
    assert list(verdicts(tmp_path)) == [("toy_a", 1)]
    assert "- toy_b: measured only in base" in result.output
    assert "- toy_a at concurrency 4: measured only in base" in result.output


def _copy(src: Path, dst: Path, edit_rows=None, edit_settings=None) -> Path:
    """A hand-edited copy of a recorded directory (labelled so in each test that uses it)."""
    shutil.copytree(src, dst)
    (dst / "repeats.csv").unlink(missing_ok=True)
    table = pd.read_csv(dst / "results.csv")
    if edit_rows:
        table = edit_rows(table)
    table.to_csv(dst / "results.csv", index=False)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["settings"].update(edit_settings or {})
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_levels_without_numbers_and_unstable_levels(tmp_path):
    # hand-edited copy of `regressed`: toy_a c=4 failed (no numbers), toy_a c=1 unstable
    def edit(table):
        failed = (table["variant"] == "toy_a") & (table["concurrency"] == 4)
        table.loc[failed, ["throughput", "p50_ms", "p99_ms"]] = float("nan")
        table.loc[failed, ["status", "stable"]] = ["failed", False]
        unstable = (table["variant"] == "toy_a") & (table["concurrency"] == 1)
        table.loc[unstable, ["status", "stable"]] = ["unstable", False]
        return table

    new = _copy(RECORDED / "regressed", tmp_path / "new", edit)
    result = run_compare(RECORDED / "base", new, tmp_path / "out")
    assert "- toy_a at concurrency 4: no numbers in new (failed)" in result.output
    row = pd.read_csv(tmp_path / "out" / "compare.csv").set_index(["variant", "concurrency"]).loc[("toy_a", 1)]
    # the unstable level's band is the relaxed 100 % (+ 25 % of the base): -59 % throughput is within it,
    # +132 % p50 is not
    assert row["status"] == "ok/unstable" and row["throughput_noise_pct"] == 125.0
    assert (row["throughput_verdict"], row["p50_verdict"]) == ("same", "regressed")
    assert result.exit_code == 1, result.output


def test_threshold_decides_when_the_noise_is_small(tmp_path):
    # hand-edited copies of `base`: stability 2 % in both runs, toy_b 15 % slower in the new one
    base = _copy(RECORDED / "base", tmp_path / "base", edit_settings={"stability_pct": 2.0})
    new = _copy(RECORDED / "base", tmp_path / "new", lambda t: t.assign(
        throughput=t["throughput"].where(t["variant"] != "toy_b", t["throughput"] * 0.85)), {"stability_pct": 2.0})
    assert set(compare_runs(base, new, 10.0).regressions["variant"]) == {"toy_b"}
    assert compare_runs(base, new, 20.0).regressions.empty
    assert compare_runs(new, base, 10.0).regressions.empty  # faster is never a regression


def test_bad_arguments_are_one_line_user_errors(tmp_path):
    result = run_compare(tmp_path / "nowhere", RECORDED / "base", tmp_path / "out")
    assert result.exit_code == 2
    assert "no results.csv here" in result.output and "Traceback" not in result.output
    result = run_compare(RECORDED / "base", RECORDED / "same", tmp_path / "out", "--threshold", "0")
    assert result.exit_code == 2 and "--threshold 0" in result.output


@pytest.mark.server
def test_real_runs_same_repository_pass_and_a_planted_regression_fails(tmp_path):
    """Two real perf runs of one repository on this (noisy, shared) machine pass the gate; the same
    model sleeping 3 ms instead of 1 ms per request is flagged."""
    from test_perf_server import make_toy_repo

    from builder.perf.run import run_perf
    from builder.runtime import start_server

    def measure(repo: Path, out: Path, server) -> Path:
        return run_perf(repo, server=server, concurrency=(1, 4), measurement_ms=1000, out=out)

    repo = make_toy_repo(tmp_path / "repo", {"toy_a": ("onnx", "fp32", 1.0, 1.0)})
    with start_server(repo) as server:
        first, second = measure(repo, tmp_path / "first", server), measure(repo, tmp_path / "second", server)
    slow = make_toy_repo(tmp_path / "slow", {"toy_a": ("onnx", "fp32", 3.0, 1.0)})
    with start_server(slow) as server:
        planted = measure(slow, tmp_path / "planted", server)

    table = pd.read_csv(first / "results.csv")
    assert table["server_cpu_pct"].notna().all() and (table["server_cpu_pct"] > 0).all()  # sampled during perf
    same = run_compare(first, second, tmp_path / "cmp_same")
    assert same.exit_code == 0, same.output
    regressed = run_compare(first, planted, tmp_path / "cmp_planted")
    assert regressed.exit_code == 1, regressed.output
    assert verdicts(tmp_path / "cmp_planted")[("toy_a", 1)] == "regressed"


def test_differing_settings_are_noted(tmp_path):
    # hand-edited copy of `same`: batch size 4 instead of 1
    new = _copy(RECORDED / "same", tmp_path / "new", edit_settings={"batch_size": 4})
    result = run_compare(RECORDED / "base", new, tmp_path / "out")
    assert "> Note: batch size differs: base 1, new 4; the numbers may not be comparable." in result.output


def test_repeats_keep_the_median_level_and_need_one_or_more():
    from builder.perf.analyzer import LevelResult, Measurement
    from builder.perf.run import median_repeat, run_perf

    def measurement(*throughputs):
        return Measurement("m", [LevelResult(1, {"throughput": t}, True, 1, "ok") if t else LevelResult(1)
                                 for t in throughputs], [])

    picked = median_repeat([measurement(300.0), measurement(100.0), measurement(200.0)])
    assert [lv.values["throughput"] for lv in picked.levels] == [200.0]
    picked = median_repeat([measurement(None), measurement(150.0)])  # a repeat without numbers is skipped
    assert picked.levels[0].values["throughput"] == 150.0
    from builder.errors import UserError

    with pytest.raises(UserError, match="repeats 0 must be >= 1"):
        run_perf(RECORDED, repeats=0)
