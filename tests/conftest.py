"""Shared pytest setup. The test layers (server, slow, gpu, matrix, reliability) are registered in
pyproject.toml; here, the reliability
harness (`make test-reliability`): every test marked `reliability` is one case of docs/RELIABILITY.md, and the
run ends with "N cases tried, M handled as specified"."""

import os
import sys

import pytest

# Triton kernels (builder/generation/paged_kernel.py) run in Triton's interpreter where there is no GPU. Triton reads
# this when it is first imported, and torch may import it before any test does.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Cases of the harness that live in other modules (tests/test_reliability.py marks its own).
RELIABILITY_CASES = (
    "tests/test_spec.py::test_bad_spec_exits_2_with_one_line_and_writes_nothing",
    "tests/test_spec.py::test_missing_spec_file",
    "tests/test_build.py::test_failed_variant_is_not_written_and_reported",
    "tests/test_build.py::test_second_build_into_same_output_is_refused",
    "tests/test_runtime.py::test_failed_model_raises_run_error_and_leaves_nothing",
    "tests/test_runtime.py::test_server_never_outlives_the_with_block",
    "tests/test_runtime.py::test_interrupt_while_waiting_stops_the_server",
    "tests/test_runtime.py::test_busy_port_is_a_user_error_before_anything_starts",
    "tests/test_runtime.py::test_bad_arguments_are_user_errors",
    "tests/test_perf.py::test_run_perf_keeps_partial_results_when_perf_analyzer_fails",
    "tests/test_ensembles.py::test_bad_requests_get_an_error_and_the_stubs_survive",
)


_counts: dict = {}


def pytest_configure(config):
    _counts.update(tried=0, handled=0, skipped=0, failed=[], notes=[])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[")[0] in RELIABILITY_CASES:
            item.add_marker(pytest.mark.reliability)


def pytest_runtest_logreport(report):
    if "reliability" not in report.keywords:
        return
    if report.when == "call":
        _counts["notes"] += [value for key, value in report.user_properties if key == "reliability_note"]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            _counts["skipped"] += 1
            return
        _counts["tried"] += 1
        if report.passed:
            _counts["handled"] += 1
        else:
            _counts["failed"].append(report.nodeid)
    elif report.when == "teardown" and report.failed and report.nodeid not in _counts["failed"]:
        _counts["handled"] -= 1  # e.g. a case that left a process behind
        _counts["failed"].append(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _counts.get("tried") and not _counts.get("skipped"):
        return
    skipped = f" ({_counts['skipped']} skipped)" if _counts["skipped"] else ""
    terminalreporter.write_sep("=", "reliability harness")
    for note in _counts["notes"]:
        terminalreporter.write_line(note)
    for nodeid in _counts["failed"]:
        terminalreporter.write_line(f"not handled as specified: {nodeid}")
    terminalreporter.write_line(f"{_counts['tried']} cases tried, {_counts['handled']} handled as specified{skipped}")


@pytest.fixture(scope="session", autouse=True)
def build_cache(tmp_path_factory):
    """Builds in tests use a cache of their own, never ~/.cache/triton-builder."""
    path = tmp_path_factory.mktemp("build-cache")
    previous = os.environ.get("TRITON_BUILDER_CACHE")
    os.environ["TRITON_BUILDER_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("TRITON_BUILDER_CACHE", None)
    else:
        os.environ["TRITON_BUILDER_CACHE"] = previous


@pytest.fixture(scope="module")
def importable(tmp_path_factory):
    """importable(name, text): write module `name` into a fresh folder on sys.path for this test module (e.g. the
    factories a spec's `source: {factory: ...}` names); the folders leave sys.path afterwards."""
    folders = []

    def write(name: str, text: str):
        folder = tmp_path_factory.mktemp(name)
        (folder / f"{name}.py").write_text(text)
        sys.path.insert(0, str(folder))
        folders.append(folder)
        return folder

    yield write
    for folder in folders:
        sys.path.remove(str(folder))
