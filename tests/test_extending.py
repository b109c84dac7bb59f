"""docs/EXTENDING.md's worked examples, built: a new family, a new format (run from the page's own text) and
a new LLM architecture."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from builder.build import build
from builder.manifest import read_manifest
from builder.validate import validate_repository
from tiny_llm import make_model_dir, spec_text

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs/EXTENDING.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), re.S)


def test_the_family_on_the_page_is_the_one_in_the_package_and_its_spec_builds(tmp_path):
    code = blocks("python")[0]
    assert code.strip() in (ROOT / "builder" / "families" / "token.py").read_text()
    spec = tmp_path / "spec.yaml"
    spec.write_text(blocks("yaml")[0])
    assert yaml.safe_load(spec.read_text())["models"][0]["task"] == "token-classification"
    result = build(spec, tmp_path / "repo", console=Console(file=io.StringIO()))
    assert [(r.triton_name, r.status) for r in result.results] == [("ner_onnx_fp32", "passed"), ("ner_onnx_int8", "passed")]
    entry = read_manifest(tmp_path / "repo")["models"]["ner_onnx_fp32"]
    assert entry["signature"]["outputs"][0]["dims"] == [-1, 5]  # a label score per token
    assert validate_repository(tmp_path / "repo") == 2


def test_the_format_on_the_page_builds_and_is_served_by_the_runner_it_names(tmp_path):
    (tmp_path / "onnx_optimized.py").write_text(blocks("python")[1])
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - name: enc\n    task: feature-extraction\n    source: {config: {model_type: bert, "
                    "vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, "
                    "intermediate_size: 32}}\n    variants: [{format: onnx-optimized}, {format: onnx}]\n")
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import onnx_optimized\n"  # registered before the spec loads
              "from builder.build import build; from builder.validate import validate_repository\n"
              "r = build(sys.argv[2], sys.argv[3], cache=False)\n"
              "print([(x.triton_name, x.status) for x in r.results], validate_repository(sys.argv[3]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(spec), str(tmp_path / "repo")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[('enc_onnx-optimized_fp32', 'passed'), ('enc_onnx_fp32', 'passed')] 2"
    config = (tmp_path / "repo" / "enc_onnx-optimized_fp32" / "config.pbtxt").read_text()
    assert 'string_value: "onnx"' in config  # served by the runner the record names


@pytest.mark.parametrize("arch", ["phi3"])
def test_the_architecture_on_the_page_builds_and_matches_hf_generate(arch, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(make_model_dir(tmp_path / "m", arch)))
    result = build(spec, tmp_path / "repo", console=Console(file=io.StringIO()))
    assert [(r.triton_name, r.status) for r in result.results] == [("tiny", "passed")]
    check = read_manifest(tmp_path / "repo")["models"]["tiny"]["verification"]
    assert check["greedy_equal_to_hf"] == check["prompts"] == 4 and check["continuous_batching_equal"] == 4
