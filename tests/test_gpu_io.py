"""The runner's tensor path on the real embedded Triton (2.51): torch artifacts take their inputs through
DLPack and answer through `Tensor.from_dlpack`, requests the batcher groups are joined once and split
into views, and a bad request inside a batch is answered alone. Run on CPU instances here; the GPU
settings (FORCE_CPU_ONLY_INPUT_TENSORS "no") are checked as rendered, and served on a CPU instance."""

import io
import json
import shutil
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from rich.console import Console

from builder.manifest import read_manifest

VOCAB = 300
SPEC = f"""
defaults:
  max_batch_size: 8
  # a long delay, so that requests sent together are run as one batch
  dynamic_batching: {{max_queue_delay_us: 300000, preferred_batch_sizes: [4]}}
models:
  - name: enc
    task: feature-extraction
    source: {{config: {{model_type: bert, vocab_size: {VOCAB}, hidden_size: 32, num_hidden_layers: 2,
                       num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}}}
    shapes: {{max_sequence_length: 32, sequence_length: 8}}
    variants:
      - {{format: torch, precision: fp32}}
      - {{format: onnx, precision: fp32}}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from builder.build import build
    from builder.runtime import start_server

    root = tmp_path_factory.mktemp("gpu_io")
    (root / "spec.yaml").write_text(SPEC)
    console = Console(file=io.StringIO(), width=200)
    result = build(root / "spec.yaml", root / "repo", console=console, cache=False)
    assert not result.failed, console.file.getvalue()
    repo = root / "repo"
    # the GPU instances' setting, on a CPU instance: inputs may then come in any memory; the runner takes
    # them through DLPack all the same
    shutil.copytree(repo / "enc_torch_fp32", repo / "enc_torch_fp32_anywhere")
    config = repo / "enc_torch_fp32_anywhere" / "config.pbtxt"
    text = config.read_text().replace('name: "enc_torch_fp32"', 'name: "enc_torch_fp32_anywhere"')
    config.write_text(text + 'parameters { key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no" } }\n')
    # every batch logs where its time went (the runner's clock, a window of 1 ms)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_BUILDER_CLOCK", "0.001")
        with start_server(repo, log_path=root / "server.log") as server:
            yield repo, server


def reference(repo, name, ids, mask):
    """The variant's own artifact in-process (the build's runner for its format)."""
    from builder import formats
    from builder.manifest import signature_of

    entry = read_manifest(repo)["models"][name]
    fmt = formats.get(entry["format"])
    run = fmt.runner(repo / name / "1" / fmt.artifact, signature_of(entry), "fp32", "cpu")
    return run({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})


def send_together(server, model, requests):
    """Send every request at once over gRPC; return (answers or errors, in order)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    done, answers = threading.Semaphore(0), [None] * len(requests)
    try:
        for i, (ids, mask) in enumerate(requests):
            tensors = []
            for name, value in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids))):
                t = grpcclient.InferInput(name, list(value.shape), "INT64")
                t.set_data_from_numpy(value)
                tensors.append(t)

            def callback(result, error, i=i):
                answers[i] = error if error is not None else result.as_numpy("last_hidden_state")
                done.release()

            client.async_infer(model, tensors, callback)
        for _ in requests:
            assert done.acquire(timeout=60)
    finally:
        client.close()
    return answers


def executions(server, model):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()
    return int(stats["inference_count"]), int(stats["execution_count"])


def batch(rows, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (rows, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[-1, length // 2:] = 0  # a padded row
    return ids, mask


@pytest.mark.server
@pytest.mark.parametrize("model", ["enc_torch_fp32", "enc_torch_fp32_anywhere", "enc_onnx_fp32"])
def test_batched_requests_are_joined_once_and_split_back(served, model):
    repo, server = served
    requests = [batch(rows, 12, seed) for seed, rows in enumerate((1, 3, 2, 1))]
    before = executions(server, model)
    answers = send_together(server, model, requests)
    inferences, runs = (a - b for a, b in zip(executions(server, model), before))
    assert inferences == 7 and runs < 4  # the requests (7 rows) ran in fewer executions than requests
    variant = model.removesuffix("_anywhere")
    for (ids, mask), got in zip(requests, answers):
        want = reference(repo, variant, ids, mask)["last_hidden_state"]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.server
@pytest.mark.parametrize("model", ["enc_torch_fp32", "enc_onnx_fp32"])
def test_the_clock_logs_where_each_batch_spent_its_time(served, model):
    import re
    import time

    repo, server = served
    send_together(server, model, [batch(rows, 10, 30 + rows) for rows in (1, 3)])  # 4 rows: the preferred batch
    pattern = re.compile(rf"execute clock of {model} \([^)]*\): 1 batches, 4\.0 rows a batch; ms a batch: "
                         r"requests ([\d.]+), join ([\d.]+), run ([\d.]+), outputs ([\d.]+), responses ([\d.]+), "
                         r"in execute ([\d.]+), between executes ([\d.]+)")
    deadline = time.monotonic() + 20
    while not (found := pattern.findall(server.log_path.read_text())) and time.monotonic() < deadline:
        time.sleep(0.2)  # the stub's log lines reach the server's log through its IPC
    assert found, server.log_path.read_text()[-2000:]
    *phases, inside, _ = (float(x) for x in found[-1])
    assert phases[2] > 0 and all(p >= 0 for p in phases)  # the forward itself took time
    assert inside == pytest.approx(sum(phases), abs=0.01)
    # loading's objects are frozen out of the garbage collector's full scans (a stall mid-serving otherwise)
    [frozen] = re.findall(rf"{model} \([^)]*\) ready: (\d+) objects left out", server.log_path.read_text())
    assert int(frozen) > 10_000
    # the GPU bench reads the same lines into env.json (perf/gpu/bench.py)
    windows = bench_module("bench").execute_clock(server.log_path)[model]
    assert any(w["rows"] == 4.0 and w["in execute"] == inside and w["run"] == phases[2] for w in windows)


@pytest.mark.server
def test_a_bad_clock_setting_fails_the_load_in_one_line(served, tmp_path, monkeypatch):
    from builder.errors import RunError
    from builder.runtime import start_server

    repo, _ = served
    one = tmp_path / "repo"
    shutil.copytree(repo / "enc_onnx_fp32", one / "enc_onnx_fp32")
    for f in repo.glob("*.json"):
        shutil.copy2(f, one / f.name)
    monkeypatch.setenv("TRITON_BUILDER_CLOCK", "soon")
    with pytest.raises(RunError) as failed:
        with start_server(one, log_path=tmp_path / "server.log", ready_timeout=60):
            pass
    assert "TRITON_BUILDER_CLOCK='soon': expected seconds between clock lines" in str(failed.value)


@pytest.mark.server
@pytest.mark.parametrize("model", ["enc_torch_fp32", "enc_onnx_fp32"])
def test_an_id_outside_the_vocabulary_fails_only_its_own_request(served, model):
    repo, server = served
    requests = [batch(2, 12, 10), batch(1, 12, 11), batch(3, 12, 12)]
    requests[1][0][0, 3] = VOCAB + 5
    answers = send_together(server, model, requests)
    assert f"input_ids: values must be in [0, {VOCAB}) (the vocabulary); got" in str(answers[1])
    for i in (0, 2):
        want = reference(repo, model, *requests[i])["last_hidden_state"]
        np.testing.assert_allclose(answers[i], want, atol=1e-4)


@pytest.mark.server
def test_requests_of_different_lengths_run_apart(served):
    repo, server = served
    requests = [batch(2, 12, 20), batch(1, 7, 21), batch(2, 12, 22)]
    answers = send_together(server, "enc_torch_fp32", requests)
    for request, got in zip(requests, answers):
        np.testing.assert_allclose(got, reference(repo, "enc_torch_fp32", *request)["last_hidden_state"], atol=1e-4)


def test_gpu_torch_variants_keep_gpu_inputs_on_the_gpu():
    from builder.formats import torch as torch_format
    from builder.spec import Instances

    def params(kind):
        sig = SimpleNamespace(inputs=(), outputs=(), max_batch_size=8)
        variant = SimpleNamespace(compile="none", cuda_graphs=False)
        job = SimpleNamespace(variant=variant, sig=sig, serving={"instances": Instances(kind=kind)})
        return torch_format.parameters(job, None)

    assert params("gpu")["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in params("cpu")


def test_graph_static_inputs_exist_for_every_input_dtype():
    """A uint8 CLIP tower once failed to load on the H100: its graph capture filled pixels with randn,
    which has no integer kernel. Each dtype the runner can be given gets a buffer of valid values."""
    import torch

    from builder.ensembles import python_model

    runner = python_model("runner.py")
    pixels = runner.static_input(torch, [2, 3, 4, 4], "uint8", False, "cpu")
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 4, 4)
    ids = runner.static_input(torch, [2, 8], "int64", False, "cpu")
    assert ids.dtype == torch.int64 and int(ids.max()) == 0  # a valid index into any vocabulary
    mask = runner.static_input(torch, [2, 8], "int64", True, "cpu")
    assert bool((mask == 1).all())
    floats = runner.static_input(torch, [2, 3], "float32", False, "cpu")
    assert floats.dtype == torch.float32 and float(floats.abs().sum()) > 0


def test_shape_checks_read_numpy_and_torch_alike():
    import torch

    from builder.ensembles import python_model

    runner = python_model("runner.py")
    limits = json.loads('{"input_ids": {"max_dims": [32], "high": 300}, "attention_mask": {"max_dims": [32]}}')
    names = ["input_ids", "attention_mask"]
    for wrap in (np.asarray, torch.from_numpy):
        ok = [wrap(np.ones((2, 5), np.int64)), wrap(np.ones((2, 5), np.int64))]
        assert runner.check_request(names, ok, limits, True) is None
        long = [wrap(np.ones((1, 40), np.int64)), wrap(np.ones((1, 40), np.int64))]
        assert runner.check_request(names, long, limits, True).startswith("input_ids: shape [1, 40] is above the maximum")
        bad = [wrap(np.full((2, 5), 300, np.int64)), wrap(np.ones((2, 5), np.int64))]
        assert runner.check_request(names, bad, limits, True, values=False) is None  # values are checked per batch
        assert runner.check_values(names, bad, limits) == ("input_ids: values must be in [0, 300) (the vocabulary); "
                                                           "got 300 to 300")


# --- make bench-gpu: the GPU encoder targets (perf/gpu/targets.py, perf/gpu/bench.yaml) --------------------

def bench_targets():
    return bench_module("targets")


def bench_module(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "perf" / "gpu" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_targets_take_the_best_point_within_the_latency_budget():
    import pandas as pd

    rows = [("bert_torch_fp32", 1, 70, 13.0, 20.0), ("bert_torch_fp32", 256, 1500, 150.0, 290.0),
            ("bert_torch_bf16_inductor_graphs", 1, 450, 1.7, 3.0), ("bert_torch_bf16_graphs", 1, 420, 1.9, 3.0),
            ("bert_torch_bf16_inductor_graphs", 128, 11000, 11.0, 45.0),
            ("bert_torch_bf16_inductor_graphs", 256, 12500, 20.0, 60.0),  # more, but beyond the 50 ms budget
            ("clip_image_torch_fp32", 64, 1000, 60.0, 120.0),
            ("clip_u8_image_torch_fp16_graphs", 64, 5200, 11.0, 40.0),
            ("clip_u8_image_torch_fp16_graphs", 256, 8100, 30.0, 70.0),
            ("clip_text_torch_fp16_graphs", 64, 8000, 7.0, 18.0)]
    table = pd.DataFrame([dict(variant=v, concurrency=c, throughput=t, p50_ms=p50, p99_ms=p99, status="ok")
                          for v, c, t, p50, p99 in rows])
    previous = table[table["variant"] == "clip_text_torch_fp16_graphs"].assign(throughput=9098.0)
    targets = bench_targets()
    got = [(v.value, v.met) for v in targets.evaluate(table, previous)]
    assert got == [(11000.0, False), (1.7, True), (5.2, True), (5200.0, False), (pytest.approx(8000 / 9098), False)]
    text = targets.markdown(targets.evaluate(table, previous))
    assert "| BERT-base seq 128: infer/s within p99 <= 50 ms | 11,000 | >= 12,000 | **missed** | " \
           "bert_torch_bf16_inductor_graphs at c=128 (p99 45.0 ms) | fp32 eager 70/s (bert_torch_fp32 at c=1 " \
           "(p99 20.0 ms)) |" in text
    assert text.endswith("2 of 5 targets met.\n")
    empty = targets.evaluate(table.iloc[:0])
    assert [v.value for v in empty] == [None] * 4 and not any(v.met for v in empty)


def test_bench_spec_builds_every_model_the_targets_read():
    from pathlib import Path

    from builder.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "perf" / "gpu" / "bench.yaml")
    built = set()
    for m in spec.models:
        parts = ("image", "text") if m.task == "zero-shot-image-classification" else ("",)
        built |= {f"{m.name}_{p}_{v.tag}" if p else f"{m.name}_{v.tag}" for p in parts for v in m.variants}
    targets = bench_targets()
    wanted = {*targets.CLIP_IMAGE_U8, targets.CLIP_TEXT, "bert_torch_fp32", "clip_image_torch_fp32"}
    assert wanted <= built and built & set(targets.BERT)
    models = {m.name: m for m in spec.models}
    assert (models["clip_u8"].image_input, models["clip"].image_input) == ("uint8", "float32")
    assert all(spec.serving(m)["instances"].kind == "gpu" for m in spec.models)
    # the instance-count comparison: the same BERT variant with 4, 6 and 1 instances (1: the c=1 latency
    # configuration); the uint8 image tower with 4
    counts = [spec.serving(models[n])["instances"].count for n in ("bert", "bert6", "bert1", "clip_u8")]
    assert counts == [4, 6, 1, 4]
    assert {f"{n}_torch_bf16_inductor_graphs" for n in ("bert", "bert6", "bert1")} <= built & set(targets.BERT)
    # no batching delay: batches leave at a CUDA graph's size (with 100 us: 31-48 rows, padded up to 64)
    assert all(spec.serving(m)["dynamic_batching"].max_queue_delay_us == 0 for m in spec.models)
