"""The main job end to end on the real server: build -> serve -> infer (HTTP, gRPC) -> perf -> report."""

import numpy as np
import pytest

from builder.build import build
from builder.manifest import load_reference, read_manifest

SPEC = """
defaults:
  max_batch_size: 8
  dynamic_batching: {max_queue_delay_us: 100}
models:
  - name: enc
    task: feature-extraction
    source: {config: {model_type: bert, vocab_size: 400, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
                      intermediate_size: 64, max_position_embeddings: 64}}
    shapes: {max_sequence_length: 32, sequence_length: 10}
    variants:
      - {format: onnx, precision: fp32}
      - {format: onnx, precision: int8}
      - {format: torch, precision: fp32}
"""

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from builder.runtime import start_server

    root = tmp_path_factory.mktemp("e2e")
    (root / "spec.yaml").write_text(SPEC)
    # keep_going: a variant that fails its build fails its own tests (the server does not load it), not all
    build(root / "spec.yaml", root / "repo", keep_going=True)
    with start_server(root / "repo") as server:
        yield root / "repo", server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("variant", ["enc_onnx_fp32", "enc_torch_fp32", "enc_onnx_int8"])
def test_served_outputs_match_pytorch_reference(served, protocol, variant):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    repo, server = served
    inputs, outputs = load_reference(repo / variant / "reference.npz")
    module = httpclient if protocol == "http" else grpcclient
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    req = []
    for name, value in inputs.items():
        tensor = module.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value)
        req.append(tensor)
    result = client.infer(variant, req)
    got = result.as_numpy("last_hidden_state")
    want = outputs["last_hidden_state"]
    assert got.shape == want.shape
    if variant.endswith("int8"):
        cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
        assert cos > 0.98
    else:
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_self_check_passes(served):
    from builder.runtime import self_check

    repo, server = served
    results = self_check(server, repo)
    assert sorted(r.model for r in results) == ["enc_onnx_fp32", "enc_onnx_int8", "enc_torch_fp32"]
    assert all(r.ok for r in results)


def test_short_perf_run_and_report(served, tmp_path):
    import pandas as pd

    from builder.perf import run_perf, write_report

    repo, server = served
    out = run_perf(repo, server=server, concurrency=(1, 2), out=tmp_path / "run", measurement_ms=1000,
                   models=["enc_onnx_fp32", "enc_onnx_int8"])
    table = pd.read_csv(out / "results.csv")
    assert sorted(zip(table.variant, table.concurrency)) == [("enc_onnx_fp32", 1), ("enc_onnx_fp32", 2),
                                                             ("enc_onnx_int8", 1), ("enc_onnx_int8", 2)]
    assert (table.throughput > 0).all() and (table.p99_ms > 0).all()
    report = write_report(out, latency_budget_ms=1000, accuracy_budget=0.9)
    text = report.read_text()
    assert "is the best choice" in text
    assert (out / "enc_throughput_vs_p99.png").stat().st_size > 1000
    outputs = read_manifest(repo)["models"]["enc_onnx_int8"]["verification"]["outputs"]
    cos = min(o["cosine"] for o in outputs.values())
    assert f"{cos:.6f}" in text  # accuracy from the build sits next to the speed numbers
