"""`image_input: uint8`: image models take uint8 pixels, the image processor's rescale and normalization
inside the exported model; verified against the fp32 source, served, and fed by the ensemble's pre step."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from builder.manifest import load_reference, read_manifest
from test_ensembles import SIZE, tiny_clip, tiny_vit

SPEC = """
defaults: {max_batch_size: 8, dynamic_batching: {max_queue_delay_us: 100}}
models:
  - name: vit
    task: image-classification
    source: {path: vit}
    image_input: uint8
    variants:
      - {format: onnx, precision: fp32}
      - {format: onnx, precision: fp16}
      - {format: torch, precision: fp32}
    ensemble: {top_k: 3, per_variant: true}
  - name: clip
    task: zero-shot-image-classification
    source: {path: clip}
    image_input: uint8
    variants: [{format: torch, precision: fp32}]
    ensemble: {}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from builder.build import build

    root = tmp_path_factory.mktemp("uint8")
    tiny_vit(root / "vit")
    tiny_clip(root / "clip")
    (root / "spec.yaml").write_text(SPEC)
    console = Console(file=io.StringIO(), width=200)
    result = build(root / "spec.yaml", root / "repo", console=console, cache=False)
    assert not result.failed, console.file.getvalue()
    return root


def test_spec_refuses_image_input_on_a_text_model(tmp_path):
    from builder.errors import UserError
    from builder.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text("models:\n  - {name: t, task: feature-extraction, source: {config: {model_type: bert}}, "
                    "image_input: uint8, variants: [{format: onnx}]}\n")
    with pytest.raises(UserError) as err:
        load_spec(path)
    assert str(err.value) == (f"{path}: models[0](t): image_input applies to image models (image-classification, "
                              "zero-shot-image-classification); this model's task is feature-extraction: remove image_input")


def test_uint8_part_equals_the_fp32_model_on_processor_pixels(tmp_path):
    """The uint8 part on raw pixels gives what the unchanged model gives on transformers' processed pixels."""
    import torch
    from transformers import ViTImageProcessor

    from builder.families import parts_for
    from builder.sources import load_source
    from builder.spec import load_spec

    tiny_vit(tmp_path / "vit")
    (tmp_path / "spec.yaml").write_text(SPEC.split("  - name: clip")[0])
    spec = load_spec(tmp_path / "spec.yaml")
    model = spec.models[0]
    loaded = load_source(tmp_path / "spec.yaml", model)
    (part,) = parts_for(model.task, loaded, model)
    assert (part.inputs[0].dtype, part.inputs[0].dims) == ("uint8", (3, SIZE, SIZE))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, SIZE, SIZE), dtype=np.uint8)
    processor = ViTImageProcessor.from_pretrained(tmp_path / "vit")
    processed = processor(images=list(pixels.transpose(0, 2, 3, 1)), do_resize=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = loaded.module(pixel_values=processed).logits
        (got,) = part.module(torch.from_numpy(pixels))
    assert part.extra["pixel_normalization"] == {"rescale_factor": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_variants_take_uint8_and_pass_verification(built):
    entries = read_manifest(built / "repo")["models"]
    for name in ("vit_onnx_fp32", "vit_onnx_fp16", "vit_torch_fp32", "clip_image_torch_fp32"):
        (pixels,) = entries[name]["signature"]["inputs"]
        assert (pixels["name"], pixels["dtype"]) == ("pixel_values", "uint8"), name
        assert entries[name]["verification"]["passed"], name
    assert entries["clip_text_torch_fp32"]["signature"]["inputs"][0]["dtype"] == "int64"
    inputs, _ = load_reference(built / "repo" / "vit_torch_fp32" / "reference.npz")
    assert inputs["pixel_values"].dtype == np.uint8 and inputs["pixel_values"].max() > 128  # real pixel values


def test_ensembles_send_uint8_pixels_and_match_transformers(built):
    repo = built / "repo"
    entries = read_manifest(repo)["models"]
    for pre in ("vit_pre", "clip_pre"):
        settings = json.loads((repo / pre / "1" / "image_processor.json").read_text())
        assert (settings["output"], settings["rescale_factor"], settings["mean"], settings["std"]) == ("uint8", None, None, None)
        assert entries[pre]["verification"]["pixels_max_abs"] == 0.0  # = transformers' resize + crop, unscaled
        pixels = next(t for t in entries[pre]["signature"]["outputs"] if t["name"] == "pixel_values")
        assert pixels["dtype"] == "uint8"
    # end to end against the fp32 source with transformers' own image processor
    for name in ("vit", "vit_onnx_fp16_ensemble", "vit_torch_fp32_ensemble", "clip"):
        assert entries[name]["status"] == "passed", (name, entries[name]["verification"])
    assert entries["vit"]["verification"]["top1_agreement"] == 1.0
    assert entries["clip"]["verification"]["outputs"]["PROBABILITIES"]["max_abs"] < 1e-4


@pytest.mark.server
def test_served_uint8_variants_and_ensembles(built):
    import tritonclient.http as httpclient

    from builder.ensembles import check_ensemble_e2e
    from builder.runtime import self_check, start_server

    repo = built / "repo"
    with start_server(repo) as server:
        checks = self_check(server, repo)
        assert [c.model for c in checks if not c.ok] == []
        for name in ("vit", "vit_torch_fp32_ensemble", "clip"):
            assert check_ensemble_e2e(server, repo, name)["passed"], name
        inputs, outputs = load_reference(repo / "vit_torch_fp32" / "reference.npz")
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            pixels = httpclient.InferInput("pixel_values", list(inputs["pixel_values"].shape), "UINT8")
            pixels.set_data_from_numpy(inputs["pixel_values"])
            got = client.infer("vit_torch_fp32", [pixels]).as_numpy("logits")
            wrong = httpclient.InferInput("pixel_values", list(inputs["pixel_values"].shape), "FP32")
            wrong.set_data_from_numpy(inputs["pixel_values"].astype(np.float32))
            with pytest.raises(Exception, match="UINT8"):
                client.infer("vit_torch_fp32", [wrong])
        finally:
            client.close()
    np.testing.assert_allclose(got, outputs["logits"], atol=1e-4)


def test_factory_source_refuses_uint8(tmp_path):
    from builder.errors import UserError
    from builder.families import parts_for
    from builder.spec import Model

    model = Model(name="f", task="image-classification", source={"factory": "x.y:z"}, image_input="uint8",
                  variants=[{"format": "onnx"}])
    loaded = type("Loaded", (), {"config": None})()
    with pytest.raises(UserError, match=r"models\[f\].image_input: uint8 needs a Hugging Face image model"):
        parts_for(model.task, loaded, model)
