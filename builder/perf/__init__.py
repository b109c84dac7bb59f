"""Measure a built repository with perf_analyzer and report on it.

    from builder.perf import run_perf, write_report
    results_dir = run_perf(repo, concurrency=(1, 4, 16))      # results.csv + manifest.json
    report = write_report(results_dir, latency_budget_ms=20)   # report.md + PNG plots

The names are imported lazily (pandas, matplotlib load only when used), so importing the package
stays cheap for the CLI.
"""

from __future__ import annotations

_LAZY = {
    "run_perf": "builder.perf.run",
    "write_report": "builder.perf.report",
    "load_results": "builder.perf.results",
    "PerfFlags": "builder.perf.analyzer",
    "find_perf_analyzer": "builder.perf.analyzer",
    "measure": "builder.perf.analyzer",
    "input_data": "builder.perf.inputs",
    "write_input_data": "builder.perf.inputs",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'builder.perf' has no attribute {name!r}")
