"""The architecture matrix: tiny random-init configs of real Hugging Face architectures
(tests/architectures.py) over every format x precision the spec offers. Each variant builds and
verifies, or fails verification as a result with its numbers, or is refused before any work with one
line saying why and what to use instead; never a traceback, never an "error".

The full matrix is marked `matrix` (`make test-matrix`, ~4 min on 2 cores; with MATRIX_REPORT=FILE it
writes the result table, docs/MATRIX.md); a fast subset runs in `make test`.
"""

import os
import time
from pathlib import Path

import pytest
from rich.console import Console

from architectures import ARCHITECTURES, VARIANTS, spec_text
from builder.build import build
from builder.errors import UserError
from builder import cpu
from builder.spec import FORMATS, PRECISIONS, load_spec

# Every (format, precision) the spec's types allow; the ones not in VARIANTS must be refused.
REFUSED = [(f, p) for f in FORMATS for p in PRECISIONS
           if f != "tensorrt" and not any(v["format"] == f and v["precision"] == p for v in VARIANTS)]
TENSORRT = [p for p in PRECISIONS if p != "int4"]
FAST = {"mpnet": VARIANTS[3:4], "gpt2": VARIANTS[1:2], "resnet": VARIANTS[7:8], "deberta_v2": VARIANTS[2:3]}

_results: dict[str, list[tuple]] = {}


def run(tmp_path: Path, names, variants) -> list:
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(names, variants))
    with open(os.devnull, "w") as sink:
        result = build(spec, tmp_path / "repo", keep_going=True, cache=False, console=Console(file=sink))
    for r in result.results:
        # a result: passed, or failed with its numbers; "error" (a crash in a step) is never one
        assert r.status in ("passed", "failed"), r.describe()
        if r.status == "failed":
            assert r.worst_cosine is not None and r.message.startswith("- "), r.describe()
    return result.results


def check_refusals(tmp_path: Path, name: str) -> list[tuple]:
    """Variants the spec refuses (one line, naming what to use), and TensorRT where no TensorRT is."""
    rows = []
    for fmt, precision in REFUSED + [("tensorrt", "int4")]:
        spec = tmp_path / f"{fmt}_{precision}.yaml"
        spec.write_text(spec_text([name], [{"format": fmt, "precision": precision}]))
        with pytest.raises(UserError) as err:
            load_spec(spec)
        line = str(err.value).split(": ", 2)[-1]
        assert "\n" not in line and "use " in line, line
        rows.append((f"{fmt}_{precision}", "refused", line))
    spec = tmp_path / "tensorrt.yaml"
    spec.write_text(spec_text([name], [{"format": "tensorrt", "precision": p} for p in TENSORRT]).replace(
        '"defaults"', '"runtime": "native", "defaults"'))
    from builder.convert.onnx2trt import check_available

    try:
        check_available("here")
    except UserError:
        with pytest.raises(UserError) as err:
            build(spec, tmp_path / "trt_repo", cache=False, console=Console(file=open(os.devnull, "w")))
        assert not (tmp_path / "trt_repo").exists()  # refused before any work
        line = str(err.value).split(": ", 3)[-1]
        rows += [(f"tensorrt_{p}", "refused", line) for p in TENSORRT]
    return rows


def test_fast_subset(tmp_path):
    results = []
    for name, variants in FAST.items():
        results += run(tmp_path / name, [name], variants)
    assert {r.triton_name: r.status for r in results} == {
        "mpnet_onnx_int8_static": "passed", "gpt2_onnx_fp16": "passed", "resnet_torch_bf16": "passed",
        "deberta_v2_onnx_int8": "passed"}
    check_refusals(tmp_path, "gpt2")


@pytest.mark.matrix
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture(name, tmp_path):
    t0 = time.time()
    rows = [(r.variant, r.status, "" if r.status == "passed" else r.message.strip().removeprefix("- "),
             r.worst_cosine) for r in run(tmp_path, [name], VARIANTS)]
    rows += [(tag, status, why, None) for tag, status, why in check_refusals(tmp_path, name)]
    _results[name] = (ARCHITECTURES[name][0], ARCHITECTURES[name][1]["model_type"], rows, time.time() - t0)


@pytest.fixture(scope="module", autouse=True)
def matrix_report():
    yield
    target = os.environ.get("MATRIX_REPORT")
    if target and _results:
        Path(target).write_text(render(_results))


def render(results: dict) -> str:
    tags = [r[0] for r in next(iter(results.values()))[2]]
    passed = sum(1 for _, _, rows, _ in results.values() for r in rows if r[1] == "passed")
    failed = [(n, r) for n, (_, _, rows, _) in results.items() for r in rows if r[1] == "failed"]
    refused = {r[0]: r[2] for _, _, rows, _ in results.values() for r in rows if r[1] == "refused"}
    built = sum(1 for _, _, rows, _ in results.values() for r in rows if r[1] != "refused")
    lines = [
        "# The architecture matrix",
        "",
        f"Last run: {time.strftime('%Y-%m-%d')}, `make test-matrix` (tests/test_matrix.py) on the 2-core development "
        "machine, CPU only. Tiny random-init configs of real Hugging Face architectures (tests/architectures.py), "
        "every variant verified against the fp32 PyTorch model on 4 fresh batches.",
        "",
        f"The CPU: {cpu.describe()['machine']} with {', '.join(cpu.features()) or 'no features reported'}. Where a "
        "result depends on it: int8 uses 7-bit weights, which give the same numbers with and without VNNI (checked "
        "on an emulated AVX2-only CPU, docs/PERFORMANCE.md \"CPU int8\"), so the onnx_int8 columns hold on "
        "AVX2-only CPUs too; fp16 and bf16 numerics do not depend on the instruction set here, their speed does.",
        "",
        f"{len(results)} architectures; {built} variants built: {passed} passed verification, {len(failed)} failed "
        "it (a result with its numbers, below), 0 errors, no traceback. Every other format x precision is refused "
        "before any work, with the line shown under the table.",
        "",
        "| architecture | task | model_type | " + " | ".join(t for t in tags if t not in refused) + " | seconds |",
        "|---|---|---|" + "---|" * (len([t for t in tags if t not in refused]) + 1),
    ]
    for name, (task, model_type, rows, seconds) in sorted(results.items()):
        cells = {r[0]: ("✓" if r[1] == "passed" else f"✗ {r[3]:.3f}") for r in rows if r[1] != "refused"}
        lines.append(f"| {name} | {task} | {model_type} | " + " | ".join(cells.get(t, "-") for t in tags if t not in refused)
                     + f" | {seconds:.0f} |")
    lines += ["", "✓: built and verified; ✗ x: built, failed verification, worst cosine x (the variant is not "
              "installed; `--keep-failed` keeps it).", ""]
    if failed:
        lines += ["## Verification failures", ""]
        lines += [f"- {name} {tag}: {why}" for name, (tag, _, why, _) in failed]
        lines += ["", "The failures are quantized variants of random-init tiny models. A random classification head "
                  "gives logits near zero (~0.01 for these image classifiers), where a rounding error of 1e-3 alone "
                  "turns a sample's cosine; whether a trained checkpoint of the same architecture passes is not "
                  "measured here.", ""]
    lines += ["## Refused before any work", "", "| variant | why, and what to use instead |", "|---|---|"]
    lines += [f"| {tag} | {why} |" for tag, why in refused.items()]
    return "\n".join(lines) + "\n"
