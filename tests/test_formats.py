"""Formats as records (builder/formats/): one module and one registration each."""

import pytest

from builder import formats
from builder.errors import UserError
from builder.spec import FORMATS


def test_the_spec_offers_exactly_the_registered_formats_and_tasks():
    from builder.families import tasks
    from builder.spec import LLM_FORMATS, TASKS

    assert FORMATS == formats.names() == ("onnx", "tensorrt", "torch", "tensorrt-llm", "vllm")
    assert LLM_FORMATS == formats.only_for("generation") == ("tensorrt-llm", "vllm")
    assert TASKS == tasks() and "text-generation" in TASKS
    assert {f.name for f in formats.REGISTRY["generation"].values()} == {"torch", "tensorrt-llm", "vllm"}


def test_a_name_is_registered_once_and_an_unknown_one_lists_the_known():
    with pytest.raises(ValueError, match="registered twice"):
        formats.register(formats.get("onnx"))
    with pytest.raises(UserError, match="format 'onnx2' is not known for the tensors endpoint; known: onnx, tensorrt, torch"):
        formats.get("onnx2")
    with pytest.raises(UserError, match="format 'onnx' is not known for the generation endpoint; known: tensorrt-llm, "
                                        "torch, vllm"):
        formats.get("onnx", "generation")


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


def test_the_served_runner_has_a_runner_for_every_format_record_that_names_one():
    """templates/python/runner.py stands alone in a repository, so its table is its own; it must serve exactly
    the formats whose records name a python runner."""
    from builder.paths import python_template

    named = {f.python_runner for e in formats.ENDPOINTS for f in formats.REGISTRY[e].values() if f.python_runner}
    assert set(python_template("runner").RUNNERS) == named == {"onnx", "torch"}
