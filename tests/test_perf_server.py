"""A real, short perf_analyzer run against a real Triton server (python backend, hand-made models).

The models check their inputs (ids below the vocabulary size, masks of ones) and fail the request
otherwise, so a passing run also proves the generated --input-data is valid.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from builder.manifest import MANIFEST, SCHEMA
from builder.signature import Signature, TensorSpec

VOCAB = 100

MODEL_PY = textwrap.dedent('''
    import json
    import time

    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def initialize(self, args):
            params = json.loads(args["model_config"]).get("parameters", {})
            self.delay_s = float(params["delay_ms"]["string_value"]) / 1000.0

        def execute(self, requests):
            responses = []
            for request in requests:
                ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
                mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
                if ids.min() < 1 or ids.max() >= {vocab} or not (mask == 1).all():
                    responses.append(pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("input_ids outside the vocabulary or mask not ones")))
                    continue
                time.sleep(self.delay_s)
                x = ids.astype(np.float32)
                emb = np.stack([x.mean(1), x.min(1), x.max(1), mask.sum(1).astype(np.float32)], axis=1)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding", emb)]))
            return responses
''').replace("{vocab}", str(VOCAB))

CONFIG = textwrap.dedent('''
    name: "{name}"
    backend: "python"
    max_batch_size: 8
    input [
      {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
      {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }}
    ]
    output [ {{ name: "embedding" data_type: TYPE_FP32 dims: [ 4 ] }} ]
    instance_group [ {{ kind: KIND_CPU count: 1 }} ]
    dynamic_batching {{ }}
    parameters {{ key: "delay_ms" value: {{ string_value: "{delay_ms}" }} }}
''')

SIGNATURE = Signature(
    inputs=(TensorSpec("input_ids", "int64", (-1,), kind="token_ids", high=VOCAB, opt_dims=(16,)),
            TensorSpec("attention_mask", "int64", (-1,), kind="attention_mask", opt_dims=(16,))),
    outputs=(TensorSpec("embedding", "float32", (4,)),),
    max_batch_size=8,
    extra={"vocab_size": VOCAB},
)


def make_toy_repo(root: Path, variants: dict[str, tuple[str, str, float, float]]) -> Path:
    """A repository of python-backend models with a triton-builder.json.

    variants: name -> (format, precision, delay_ms, cosine). The formats and precisions are labels
    (every model is the same python code with a different delay); the cosines are made up.
    """
    root.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, (fmt, precision, delay_ms, cosine) in variants.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, delay_ms=delay_ms))
        (root / name / "1" / "model.py").write_text(MODEL_PY)
        models[name] = {
            "role": "variant", "model": "toy", "task": "embedding", "format": fmt, "precision": precision,
            "status": "passed", "signature": SIGNATURE.to_dict(), "files": [],
            "verification": {"passed": True, "tolerance": {"min_cosine": 0.99},
                             "outputs": {"embedding": {"max_abs": round(1 - cosine, 6) * 10, "max_rel": 1 - cosine,
                                                       "cosine": cosine, "passed": True}}},
            "reference": None, "command": "hand-made for tests/test_perf_server.py",
        }
    manifest = {"schema": SCHEMA, "builder_version": "test", "runtime": "python", "spec": None,
                "tool_versions": {}, "models": models}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


@pytest.mark.server
def test_short_real_run_has_one_stable_row_per_level(tmp_path):
    from builder.perf.report import write_report
    from builder.perf.results import COLUMNS, load_results
    from builder.perf.run import run_perf
    from builder.runtime import start_server

    repo = make_toy_repo(tmp_path / "repo", {"toy_onnx_fp32": ("onnx", "fp32", 1.0, 1.0),
                                             "toy_onnx_int8": ("onnx", "int8", 0.2, 0.9991)})
    with start_server(repo) as server:
        results = run_perf(repo, server=server, concurrency=(1, 2), measurement_ms=1000, out=tmp_path / "results")

    table, manifest = load_results(results)
    assert list(table.columns) == COLUMNS
    assert manifest["complete"] is True
    for variant in ("toy_onnx_fp32", "toy_onnx_int8"):
        rows = table[table["variant"] == variant]
        assert sorted(rows["concurrency"]) == [1, 2]
        assert rows["stable"].all() and (rows["status"] == "ok").all(), rows
        assert (rows["throughput"] > 0).all() and (rows["p99_ms"] >= rows["p50_ms"]).all()
        assert rows["avg_ms"].notna().all()  # --verbose-csv gave the average
    # the slower model (1 ms sleep per request) shows it at concurrency 1
    slow, fast = (table[(table["variant"] == v) & (table["concurrency"] == 1)].iloc[0]
                  for v in ("toy_onnx_fp32", "toy_onnx_int8"))
    assert slow["p50_ms"] > 1.0 and slow["throughput"] < fast["throughput"]
    assert any("perf_analyzer" in c["command"] and "--input-data" in c["command"] for c in manifest["commands"])
    report = write_report(results)
    text = report.read_text()
    assert "toy_onnx_int8** is the best choice" in text
