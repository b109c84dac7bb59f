"""Formats as records (builder/formats/): one module and one registration each."""

import pytest

from builder import formats
from builder.errors import UserError
from builder.spec import FORMATS


def test_every_format_the_spec_offers_has_a_record():
    assert sorted(formats.get(name).name for name in FORMATS) == sorted(FORMATS)


def test_a_name_is_registered_once_and_an_unknown_one_lists_the_known():
    with pytest.raises(ValueError, match="registered twice"):
        formats.register(formats.get("onnx"))
    with pytest.raises(UserError, match="format 'onnx2' is not known; known: onnx, tensorrt, tensorrt-llm, torch, vllm"):
        formats.get("onnx2")


@pytest.mark.parametrize("name, runtime, backend", [
    ("onnx", "python", "python"), ("onnx", "native", "onnxruntime"), ("torch", "python", "python"),
    ("torch", "native", "python"), ("tensorrt", "native", "tensorrt"),
])
def test_the_record_says_which_backend_serves_it(name, runtime, backend):
    assert formats.get(name).backend(runtime)["backend"] == backend


def test_configs_and_artifacts_lead_back_to_their_format():
    assert formats.for_backend("onnxruntime").name == "onnx"
    assert formats.for_backend("", "tensorrt_plan").name == "tensorrt"
    assert formats.for_backend("python") is None
    assert formats.for_artifact("model.pt2").name == "torch" and formats.for_artifact("model.py") is None


def test_tensorrt_is_refused_before_any_work_without_native_runtime():
    with pytest.raises(UserError, match="set runtime: native"):
        formats.get("tensorrt").preflight("spec.yaml: models[m].variants[tensorrt_fp16]", "python")
