"""The TensorRT path, which cannot run here (no TensorRT, no Docker engine): the exact trtexec command
lines, the container spec, the records parsed from trtexec's output and the compatibility checks.
These prove what would be sent, not that an engine builds."""

from pathlib import Path

import numpy as np
import pytest

from builder.convert import onnx2trt
from builder.errors import UserError
from builder.signature import TensorSpec

TOKENS = [TensorSpec(n, "int64", (-1,), kind=k, high=100 if k == "token_ids" else None, max_dims=(128,), opt_dims=(64,))
          for n, k in (("input_ids", "token_ids"), ("attention_mask", "attention_mask"))]


def test_profile_from_signature_limits():
    shapes = onnx2trt.profile_shapes(TOKENS, max_batch_size=32)
    assert shapes == {"input_ids": ((1, 1), (16, 64), (32, 128)), "attention_mask": ((1, 1), (16, 64), (32, 128))}
    pixels = TensorSpec("pixel_values", "float32", (3, 224, 224), kind="pixels")
    assert onnx2trt.profile_shapes([pixels], 8)["pixel_values"] == ((1, 3, 224, 224), (4, 3, 224, 224), (8, 3, 224, 224))


def test_dynamic_dim_without_maximum_is_refused():
    open_ended = TensorSpec("x", "float32", (-1,), kind="float")
    with pytest.raises(UserError, match="input x: TensorRT needs a maximum for every dynamic dim"):
        onnx2trt.profile_shapes([open_ended], 4)


def test_build_command_line():
    shapes = onnx2trt.profile_shapes(TOKENS, max_batch_size=32)
    assert onnx2trt.build_argv("model.onnx", "model.plan", "fp16", shapes) == [
        "trtexec", "--onnx=model.onnx", "--saveEngine=model.plan", "--fp16",
        "--minShapes=input_ids:1x1,attention_mask:1x1", "--optShapes=input_ids:16x64,attention_mask:16x64",
        "--maxShapes=input_ids:32x128,attention_mask:32x128", "--skipInference"]
    assert onnx2trt.build_argv("m.onnx", "m.plan", "int8", shapes)[3:5] == ["--int8", "--fp16"]


def test_run_command_line_for_verification():
    argv = onnx2trt.run_argv("model.plan", {"input_ids": "in_input_ids.bin"}, {"input_ids": (2, 7)}, "out.json")
    assert argv == ["trtexec", "--loadEngine=model.plan", "--shapes=input_ids:2x7", "--loadInputs=input_ids:in_input_ids.bin",
                    "--exportOutput=out.json", "--iterations=1", "--warmUp=0", "--duration=0"]


def test_container_spec_runs_trtexec_of_the_serving_image(tmp_path):
    spec = onnx2trt.container_spec(tmp_path, ["trtexec", "--onnx=model.onnx"], "nvcr.io/nvidia/tritonserver:24.10-py3")
    requests = spec.pop("device_requests")
    assert spec == {"image": "nvcr.io/nvidia/tritonserver:24.10-py3", "command": ["/usr/src/tensorrt/bin/trtexec", "--onnx=model.onnx"],
                    "working_dir": "/work", "volumes": {str(tmp_path.resolve()): {"bind": "/work", "mode": "rw"}},
                    "detach": True, "shm_size": "1g", "labels": {"triton-builder": "onnx2trt"}}
    assert requests[0]["Count"] == 1 and requests[0]["Capabilities"] == [["gpu"]]


def test_version_and_gpu_read_from_trtexec_output():
    log = "[I] TensorRT version: 10.5.0\n[I] Selected Device: NVIDIA H100\n[I] Compute Capability: 9.0\n"
    assert onnx2trt.tensorrt_version(log) == "10.5.0"
    assert onnx2trt.tensorrt_version("&&&& RUNNING TensorRT.trtexec [TensorRT v100500]") == "10.5.0"
    assert onnx2trt.compute_capability(log) == "9.0"


def test_incompatible_engines_are_refused():
    record = {"tensorrt": "10.5.0", "compute_capability": "9.0"}
    onnx2trt.check_compatible(record, tensorrt="10.5.1", compute_capability="9.0", where="repo/m")
    with pytest.raises(UserError, match=r"repo/m: engine built with TensorRT 10.5.0, the target has 10.7.0; rebuild"):
        onnx2trt.check_compatible(record, tensorrt="10.7.0", compute_capability="9.0", where="repo/m")
    with pytest.raises(UserError, match=r"repo/m: engine built for compute capability 9.0, this GPU is 8.0"):
        onnx2trt.check_compatible(record, tensorrt=None, compute_capability="8.0", where="repo/m")
    assert onnx2trt.image_tensorrt("nvcr.io/nvidia/tritonserver:24.10-py3") == "10.5.0"
    assert onnx2trt.image_tensorrt("my/image:latest") is None


def test_check_repository_uses_the_image_version(tmp_path):
    manifest = {"models": {"m_tensorrt_fp16": {"tensorrt": {"tensorrt": "10.5.0", "compute_capability": "9.0"}}}}
    onnx2trt.check_repository(tmp_path, manifest, "nvcr.io/nvidia/tritonserver:24.10-py3")
    with pytest.raises(UserError, match="engine built with TensorRT 10.5.0, the target has 10.7.0"):
        onnx2trt.check_repository(tmp_path, manifest, "nvcr.io/nvidia/tritonserver:24.12-py3")


def test_tensorrt_needs_native_runtime(tmp_path):
    from builder.build import build

    spec = tmp_path / "s.yaml"
    spec.write_text("""
models:
  - name: m
    task: feature-extraction
    source: {config: {model_type: bert, vocab_size: 100, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 32}}
    variants: [{format: tensorrt, precision: fp16}]
""")
    with pytest.raises(UserError, match=r"variants\[tensorrt_fp16\]: format tensorrt is served by Triton's tensorrt backend; set runtime: native"):
        build(spec, tmp_path / "repo")


def test_images_without_a_published_tensorrt_accept_only_the_engine_of_that_image(tmp_path):
    """26.07's plain image has no TensorRT version in the NGC table: its engine is accepted there only."""
    built_in = "nvcr.io/nvidia/tritonserver:26.07-py3"
    manifest = {"models": {"m_tensorrt_fp16": {"tensorrt": {"tensorrt": "10.16.0", "compute_capability": "9.0",
                                                            "image": built_in}}}}
    assert onnx2trt.DEFAULT_IMAGE == built_in and onnx2trt.image_tensorrt(built_in) is None
    onnx2trt.check_repository(tmp_path, manifest, built_in)
    with pytest.raises(UserError, match=r"m_tensorrt_fp16: engine built in nvcr.io/nvidia/tritonserver:26.07-py3, "
                                        r"serving in nvcr.io/nvidia/tritonserver:26.06-py3, whose TensorRT version is "
                                        r"not in the NGC release table; serve with --image"):
        onnx2trt.check_repository(tmp_path, manifest, "nvcr.io/nvidia/tritonserver:26.06-py3")
    with pytest.raises(UserError, match="engine built with TensorRT 10.16.0, the target has 10.5.0"):
        onnx2trt.check_repository(tmp_path, manifest, "nvcr.io/nvidia/tritonserver:24.10-py3")
    del manifest["models"]["m_tensorrt_fp16"]["tensorrt"]["image"]  # built with trtexec on PATH
    with pytest.raises(UserError, match=r"engine built with a local TensorRT 10.16.0, serving in "
                                        r"nvcr.io/nvidia/tritonserver:26.07-py3, whose TensorRT version is not in"):
        onnx2trt.check_repository(tmp_path, manifest, built_in)
