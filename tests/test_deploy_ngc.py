"""The NGC release table (builder/deploy/ngc.py): its facts, and that every path defaults to its newest
checked tag (no 2024 image anywhere)."""

from __future__ import annotations

import pytest

from builder.deploy import ngc
from builder.errors import UserError


def test_the_default_release_and_its_facts():
    r = ngc.RELEASES[ngc.DEFAULT_TAG]
    assert ngc.DEFAULT_TAG == max(ngc.RELEASES) == "26.07"
    assert (r.triton, r.python, r.vllm, r.tensorrt_llm, r.onnxruntime, r.trtllm_tensorrt) == (
        "2.71.0", "3.12", "0.24.0", "1.2.1", "1.27.0", "10.14.1.48")
    assert ngc.RELEASES[ngc.EMBEDDED_TAG].triton == "2.51.0"  # the server nvidia-pytriton 0.7.0 bundles
    assert ngc.tensorrt("nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3") == "10.14.1.48"
    assert ngc.tensorrt("nvcr.io/nvidia/tritonserver:26.07-py3") is None  # not published: never guessed
    assert ngc.tensorrt("nvcr.io/nvidia/tritonserver:24.10-py3") == "10.5.0"


def test_every_path_defaults_to_the_table():
    from builder.convert import onnx2trt
    from builder.runtime import DEFAULT_IMAGE
    from builder.targets import trtllm, vllm

    assert DEFAULT_IMAGE == onnx2trt.DEFAULT_IMAGE == "nvcr.io/nvidia/tritonserver:26.07-py3"
    assert vllm.IMAGE == "nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3"
    assert trtllm.IMAGE == "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
    assert trtllm.image_version(trtllm.IMAGE) == "1.2.1"
    for image in (DEFAULT_IMAGE, onnx2trt.DEFAULT_IMAGE, vllm.IMAGE, trtllm.IMAGE):
        assert not ngc.tag_of(image).startswith("24.")


def test_pins_follow_the_image_python_and_stub():
    """numpy < 2 only where the python backend stub predates pybind11 2.12 (24.10 and older)."""
    assert ngc.pins("nvcr.io/nvidia/tritonserver:26.07-py3")["numpy"] == "2.4.6"
    assert ngc.pins("nvcr.io/nvidia/tritonserver:24.11-py3")["numpy"] == "1.26.4"  # Python 3.10 wheels
    assert ngc.pins("nvcr.io/nvidia/tritonserver:24.10-py3")["onnxruntime"] == "1.23.2"
    assert ngc.pins("nvcr.io/nvidia/tritonserver:24.12-py3")["onnxruntime"] == "1.27.0"
    with pytest.raises(UserError, match="image nvcr.io/nvidia/tritonserver:23.05-py3: tag not in the NGC release table"):
        ngc.pins("nvcr.io/nvidia/tritonserver:23.05-py3")


def _rows(section: str):
    import re

    for line in section.splitlines():
        if re.match(r"\|\s*\d\d\.\d\d\s*\|", line):
            yield [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_table_agrees_with_the_servers_compatibility_page():
    """Every row of tests/fixtures/deploy_ngc/compatibility.md (the server repository's page) for a tag in the
    table: the same Python, TensorRT and TensorRT-LLM (trtllm image), vLLM, and ONNX Runtime."""
    from pathlib import Path

    page = (Path(__file__).parent / "fixtures" / "deploy_ngc" / "compatibility.md").read_text()
    trtllm, rest = page.split("## Container Name: vllm-python-py3")
    vllm, ort = rest.split("## ONNX Runtime Versions")
    checked = 0
    for tag, _, python, _, tensorrt, tensorrt_llm, *_ in _rows(trtllm.split("## Container Name: trtllm-python-py3")[1]):
        if tag in ngc.RELEASES:
            r = ngc.RELEASES[tag]
            assert (r.trtllm_tensorrt, r.tensorrt_llm) == (tensorrt, tensorrt_llm), tag
            assert python.split()[1].startswith(r.python + "."), tag
            checked += 1
    for tag, _, _, version, *_ in _rows(vllm):
        if tag in ngc.RELEASES:
            assert ngc.RELEASES[tag].vllm == version.split("+")[0].replace(" ", "."), tag
    for tag, version in _rows(ort):
        if tag in ngc.RELEASES:
            assert ngc.RELEASES[tag].onnxruntime == version.split("+")[0], tag
    assert checked == len(ngc.RELEASES)  # every tag of the table is on the page
