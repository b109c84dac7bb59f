"""Perf of ensembles: image inputs as b64 perf data, and where an ensemble's time goes (steps.csv + report)."""

from __future__ import annotations

import base64
import io
import json

import pandas as pd
import pytest
from rich.console import Console

from builder.perf.inputs import input_data
from builder.signature import Signature, TensorSpec

SPEC = """
defaults: {max_batch_size: 8, dynamic_batching: {max_queue_delay_us: 100}}
models:
  - name: sentiment
    task: text-classification
    source: {path: sentiment}
    shapes: {max_sequence_length: 32}
    variants: [{format: onnx, precision: fp32}]
    ensemble: {max_length: 24}
"""


def test_image_inputs_become_b64_encoded_images():
    from PIL import Image

    sig = Signature(inputs=(TensorSpec("IMAGE", "bytes", (1,), kind="image"),), outputs=(), max_batch_size=8)
    data = input_data(sig, entries=3)["data"]
    assert len(data) == 3
    for entry in data:
        assert entry["IMAGE"]["shape"] == [1] and "content" not in entry["IMAGE"]
        raw = base64.b64decode(entry["IMAGE"]["b64"])  # Triton's serialized BYTES: length, then the file
        assert int.from_bytes(raw[:4], "little") == len(raw) - 4
        Image.open(io.BytesIO(raw[4:])).load()  # a real encoded image
    assert len({e["IMAGE"]["b64"] for e in data}) == 3
    json.dumps(data)


@pytest.mark.server
def test_ensemble_perf_reports_where_the_time_goes(tmp_path):
    from test_ensembles import tiny_text_classifier

    from builder.build import build
    from builder.manifest import read_manifest
    from builder.perf.report import write_report
    from builder.perf.run import run_perf

    tiny_text_classifier(tmp_path / "sentiment")
    (tmp_path / "spec.yaml").write_text(SPEC)
    quiet = Console(file=io.StringIO(), width=200)
    build(tmp_path / "spec.yaml", tmp_path / "repo", console=quiet)
    steps = read_manifest(tmp_path / "repo")["models"]["sentiment"]["steps"]
    assert steps[0] == "sentiment_pre" and steps[-1] == "sentiment_post" and len(steps) == 3

    out = run_perf(tmp_path / "repo", models=["sentiment"], concurrency=(1,), measurement_ms=1000,
                   out=tmp_path / "results", console=quiet)
    table = pd.read_csv(out / "steps.csv")
    assert list(table["step"]) == steps
    assert (table["variant"] == "sentiment").all() and (table["concurrency"] == 1).all()
    assert (table["requests"] > 0).all()
    assert 0.95 <= table["share"].sum() <= 1.05, table
    print(table.to_string())

    report = write_report(out).read_text()
    assert "Where the time goes" in report
    for step in steps:
        assert f"| {step} |" in report
