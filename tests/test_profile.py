"""`triton-builder profile`: the in-process breakdown on a tiny built repository (CPU), the advice
rules on constructed cases (each fires on its case and stays silent otherwise), `--try` end to end
(slow), and the resource sampler used during `perf`."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from builder.cli import app
from builder.diagnose import advice as rules
from builder.diagnose.records import CATEGORIES, Run, VariantProfile, category

TINY = {
    "defaults": {"max_batch_size": 8, "dynamic_batching": False, "instances": {"kind": "cpu", "count": 1, "threads": 1}},
    "models": [{
        "name": "tb", "task": "feature-extraction",
        "source": {"config": {"model_type": "bert", "vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}},
        "shapes": {"max_sequence_length": 64, "sequence_length": 16},
        "variants": [{"format": "onnx", "precision": "fp32"}, {"format": "torch", "precision": "fp32"}],
    }],
}


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    from builder.build import build

    root = tmp_path_factory.mktemp("profile")
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    result = build(spec, root / "repo")
    assert not result.failed
    return root / "repo"


def test_profile_breaks_down_every_variant_and_writes_traces(tiny_repo, tmp_path):
    from builder.diagnose.profile import profile_repository

    path, profiles, _ = profile_repository(tiny_repo, out=tmp_path, batches=[1, 4], iters=3)
    by_name = {p.variant: p for p in profiles}
    assert sorted(by_name) == ["tb_onnx_fp32", "tb_torch_fp32"]
    for p in profiles:
        assert p.device == "cpu" and p.threads == 1  # as config.pbtxt serves it
        assert [r.batch for r in p.runs] == [1, 4]
        for r in p.runs:
            assert r.ms_per_forward > 0 and r.ops
            assert sum(r.shares.values()) == pytest.approx(1.0)
            assert set(r.shares) == set(CATEGORIES) and r.shares["matmul"] > 0
            trace = json.loads((tmp_path / r.trace).read_text())  # Chrome trace format: Perfetto opens it
            assert any(e.get("ph") == "X" and e.get("dur", 0) > 0 for e in trace["traceEvents"])
        assert p.peak["flops"] > 0 and p.peak["bytes_per_s"] > 0
        assert p.all_threads_ms and p.all_threads_ms > 0
    torch_p, onnx_p = by_name["tb_torch_fp32"], by_name["tb_onnx_fp32"]
    # FLOPs: torch's flop counter and the ONNX matmul nodes' shapes count the same model's matmuls
    for b in (0, 1):
        assert onnx_p.runs[b].flops == pytest.approx(torch_p.runs[b].flops, rel=0.25)
    assert torch_p.runs[1].flops == pytest.approx(4 * torch_p.runs[0].flops, rel=0.05)  # linear in the batch
    # weights: the same parameters in both formats
    assert torch_p.weights_bytes == pytest.approx(onnx_p.weights_bytes, rel=0.1)
    # activations: more memory at batch 4 than at batch 1 (torch's allocator, through the profiler)
    assert torch_p.runs[1].peak_bytes > torch_p.runs[0].peak_bytes > 0
    assert any(o["name"] == "aten::addmm" and o["category"] == "matmul" for o in torch_p.runs[0].ops)
    text = path.read_text()
    assert "| tb_torch_fp32 | 1 |" in text and "## Advice" in text and "tb_onnx_fp32_b4.trace.json" in text
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert {p["variant"] for p in saved["profiles"]} == {"tb_onnx_fp32", "tb_torch_fp32"}


def test_profile_cli_errors_are_one_line(tiny_repo, tmp_path):
    result = CliRunner().invoke(app, ["profile", str(tiny_repo), "--model", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--model nope: not in this repository" in result.output
    result = CliRunner().invoke(app, ["profile", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no triton-builder.json here" in result.output


def test_only_a_bad_concurrency_is_reported_as_one(tmp_path, monkeypatch):
    """--concurrency is parsed before the work; an error inside the profile is not blamed on it."""
    import builder.diagnose.profile as profile_mod

    calls = []
    monkeypatch.setattr(profile_mod, "profile_repository", lambda *a, **k: calls.append(1))
    result = CliRunner().invoke(app, ["profile", str(tmp_path), "--concurrency", "1,x"])
    assert result.exit_code == 2 and calls == []
    assert result.output.strip() == "error: --concurrency '1,x': give integers separated by commas, e.g. 1,4"

    def broken(*args, **kwargs):
        raise ValueError("a library's own complaint")

    monkeypatch.setattr(profile_mod, "profile_repository", broken)
    result = CliRunner().invoke(app, ["profile", str(tmp_path)])
    assert "--concurrency" not in result.output  # left to main(): one line naming the error, and a traceback log
    assert isinstance(result.exception, ValueError) and str(result.exception) == "a library's own complaint"


@pytest.mark.parametrize("name, expected", [("aten::addmm", "matmul"), ("MatMulIntegerToFloat", "matmul"),
                                            ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
                                            ("Softmax", "attention"), ("SkipLayerNormalization", "normalization"),
                                            ("aten::native_layer_norm", "normalization"), ("aten::gelu", "elementwise"),
                                            ("BiasGelu", "elementwise"), ("aten::copy_", "copies"), ("Transpose", "copies"), ("DynamicQuantizeLinear", "copies"),
                                            ("DynamicQuantizeMatMul", "matmul"),
                                            ("aten::view", "other"), ("aten::arange", "other")])
def test_operator_categories(name, expected):
    assert category(name) == expected


# --------------------------------------------------------------------------- advice rules (constructed cases)

def vp(device="cpu", fmt="torch", precision="fp32", instances=1, threads=1, runs=(), params=None, **config):
    return VariantProfile("m_" + f"{fmt}_{precision}", "m", fmt, precision, device, threads, instances, list(runs),
                          config={"params": params or {}, "instances": instances, **config})


def rows(variant="m_torch_fp32", **columns):
    base = {"variant": variant, "concurrency": [1, 16], "throughput": [100.0, 300.0], "stable": [True, True],
            "server_queue_ms": [0.1, 0.1], "server_compute_input_ms": [0.05, 0.05],
            "server_compute_infer_ms": [2.0, 2.0], "server_compute_output_ms": [0.05, 0.05],
            "gpu_util_pct": [float("nan")] * 2}
    base.update(columns)
    return pd.DataFrame(base)


ENTRY = {"model": "m", "format": "torch", "precision": "fp32",
         "signature": {"inputs": [{"name": "input_ids", "dtype": "int64"}]}}


def test_gpu_tally_counts_kernel_time_once():
    """On the GPU an aten operator's self device time is its kernels' time, and each kernel is an event too:
    busy time must sum the kernels alone (the first H100 profile summed both and showed 117 % busy)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from builder.diagnose.torch_profile import tally

    def event(key, device_type, self_device_us, count=10, self_cpu_us=0.0):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=self_device_us,
                               self_cpu_time_total=self_cpu_us, count=count, is_user_annotation=False)

    events = [event("aten::addmm", DeviceType.CPU, 300.0, self_cpu_us=50.0),
              event("sm90_xmma_gemm_bf16", DeviceType.CUDA, 280.0),
              event("cublasLt::epilogue", DeviceType.CUDA, 20.0),
              event("aten::gelu", DeviceType.CPU, 100.0, self_cpu_us=20.0),
              event("vectorized_elementwise_kernel", DeviceType.CUDA, 100.0),
              event("aten::view", DeviceType.CPU, 0.0, self_cpu_us=5.0)]
    ops, busy_us, calls = tally(events, 10, gpu=True)
    assert busy_us == 40.0  # (280 + 20 + 100) / 10 forwards, each kernel once
    assert [o["name"] for o in ops] == ["aten::addmm", "aten::gelu"]  # operators only, by device time
    assert ops[0]["self_us"] == 30.0 and calls == 30
    ops, busy_us, _ = tally([e for e in events if e.device_type == DeviceType.CPU], 10, gpu=False)
    assert busy_us == 0.0 and [o["name"] for o in ops] == ["aten::addmm", "aten::gelu", "aten::view"]


def test_launch_bound_rule():
    gpu_run = Run(1, 2.0, [], {}, None, None, None, "t", kernel_busy_ms=0.5)
    tip = rules.launch_bound(vp("cuda", runs=[gpu_run]), ENTRY, pd.DataFrame())
    assert tip.change == rules.Change("m", "torch_fp32", "cuda_graphs", True)
    assert "kernels busy 0.50 ms of 2.00 ms per forward (25% < 60%)" in tip.message
    busy = Run(1, 2.0, [], {}, None, None, None, "t", kernel_busy_ms=1.8)
    assert rules.launch_bound(vp("cuda", runs=[busy]), ENTRY, pd.DataFrame()) is None
    assert rules.launch_bound(vp("cuda", runs=[gpu_run], params={"cuda_graphs": "1"}), ENTRY, pd.DataFrame()) is None
    big_batch = Run(16, 2.0, [], {}, None, None, None, "t", kernel_busy_ms=0.5)
    assert rules.launch_bound(vp("cuda", runs=[big_batch]), ENTRY, pd.DataFrame()) is None
    assert rules.launch_bound(vp("cpu", runs=[Run(1, 2.0, [], {}, None, None, None, "t")]), ENTRY, pd.DataFrame()) is None


def test_queue_rule(monkeypatch):
    monkeypatch.setattr(rules.os, "cpu_count", lambda: 4)
    queued = rows(server_queue_ms=[0.1, 6.0])
    tip = rules.queue_dominates(vp(instances=1, threads=1), ENTRY, queued)
    assert tip.change == rules.Change("m", None, "instances.count", 2)
    assert "queue 6.00 ms of 8.10 ms server time per request (74% > 50%) at concurrency 16" in tip.message
    # the instances already fill the cores: larger batches instead
    full = rules.queue_dominates(vp(instances=2, threads=2, preferred_batch_sizes=[4], max_batch_size=16), ENTRY, queued)
    assert full.change == rules.Change("m", None, "dynamic_batching.preferred_batch_sizes", [4, 16])
    assert rules.queue_dominates(vp(), ENTRY, rows()) is None
    assert rules.queue_dominates(vp(), ENTRY, pd.DataFrame()) is None


def test_compute_input_rule():
    heavy = rows(server_compute_input_ms=[0.05, 3.0])
    tip = rules.compute_input_dominates(vp(), ENTRY, heavy)
    assert "compute input 3.00 ms of 5.05 ms compute per request (59% > 30%) at concurrency 16" in tip.message
    assert "input_ids" in tip.message and tip.change.field == "ensemble"
    assert rules.compute_input_dominates(vp(), ENTRY, rows()) is None


def _manifest(int8_cosine=0.99, int8_status="passed"):
    def entry(precision, cosine, status):
        return {"role": "variant", "model": "m", "format": "onnx", "precision": precision, "status": status,
                "calibration": "dynamic", "verification": {"passed": status == "passed", "outputs": {"y": {"cosine": cosine}}}}

    return {"models": {"m_onnx_fp32": entry("fp32", 1.0, "passed"), "m_onnx_int8": entry("int8", int8_cosine, int8_status)}}


def test_quantization_rule():
    manifest = _manifest()
    table = pd.concat([rows("m_onnx_fp32"), rows("m_onnx_int8", throughput=[150.0, 450.0])])
    p = vp(fmt="onnx")
    mine = rules._measured(table, "m_onnx_fp32")
    tip = rules.quantization_wins(p, manifest["models"]["m_onnx_fp32"], mine, table=table, manifest=manifest,
                                  accuracy_budget=0.98)
    assert tip.change == rules.Change("m", None, "ensemble.variant", "onnx_int8")
    assert "m_onnx_int8 serves 150.0 infer/s against 100.0 here at concurrency 1 (1.50× ≥ 1.2×)" in tip.message
    assert rules.quantization_wins(p, {}, mine, table=table, manifest=manifest, accuracy_budget=0.995) is None  # cosine 0.99
    close = pd.concat([rows("m_onnx_fp32"), rows("m_onnx_int8", throughput=[105.0, 310.0])])
    assert rules.quantization_wins(p, {}, rules._measured(close, "m_onnx_fp32"), table=close, manifest=manifest) is None
    assert rules.quantization_wins(vp("cuda", fmt="onnx"), {}, mine, table=table, manifest=manifest) is None


def test_low_gpu_utilization_rule():
    low = rows(gpu_util_pct=[30.0, 55.0])
    tip = rules.low_gpu_utilization(vp("cuda", instances=2), ENTRY, low)
    assert "GPU utilization 55 % < 80 % at the operating point (concurrency 16, 300.0 infer/s)" in tip.message
    assert tip.change == rules.Change("m", None, "instances.count", 3)
    assert rules.low_gpu_utilization(vp("cuda"), ENTRY, rows(gpu_util_pct=[60.0, 92.0])) is None
    assert rules.low_gpu_utilization(vp("cuda"), ENTRY, rows()) is None  # not sampled


def test_oversubscribed_threads_rule():
    """threads: 0 on several instances: the H100 CLIP towers collapsed that way. Fires only on an explicit 0."""
    many = vp("cuda", instances=2, threads=0, params={"threads": "0"})
    tip = rules.oversubscribed_threads(many, ENTRY, pd.DataFrame())
    assert tip.change == rules.Change("m", None, "instances.threads", 1)
    assert "2 instances x" in tip.message and "instances.threads: 1" in tip.message
    cpu = rules.oversubscribed_threads(vp("cpu", instances=2, threads=0, params={"threads": "0"}), ENTRY, pd.DataFrame())
    assert cpu.change.value == max(1, (os.cpu_count() or 1) // 2)
    assert rules.oversubscribed_threads(vp("cuda", instances=1, threads=0, params={"threads": "0"}), ENTRY,
                                        pd.DataFrame()) is None
    assert rules.oversubscribed_threads(vp("cuda", instances=4, threads=1, params={"threads": "1"}), ENTRY,
                                        pd.DataFrame()) is None
    assert rules.oversubscribed_threads(vp("cpu", instances=4, threads=0, params={}), ENTRY, pd.DataFrame()) is None


def test_changed_spec_sets_instance_threads(tmp_path):
    from builder.diagnose.trial import changed_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    tip = rules.Advice("oversubscribed-threads", "tb_onnx_fp32", "...", {"variant_tag": "onnx_fp32"},
                       rules.Change("tb", None, "instances.threads", 4))
    assert changed_spec(spec, tip)["models"][0]["instances"] == {"kind": "cpu", "count": 1, "threads": 4, "gpus": None}


def test_failing_accuracy_rule():
    tips = rules.failing_accuracy(_manifest(int8_cosine=0.91, int8_status="failed"), None)
    assert [t.variant for t in tips] == ["m_onnx_int8"]
    assert tips[0].change == rules.Change("m", "onnx_int8", "calibration", "static")
    assert "failed verification (worst cosine 0.910000)" in tips[0].message
    assert rules.failing_accuracy(_manifest(), None) == []
    below = rules.failing_accuracy(_manifest(int8_cosine=0.97), 0.98)
    assert [t.variant for t in below] == ["m_onnx_int8"] and "0.970000 < the 0.98 budget" in below[0].message


def test_changed_spec_applies_the_change_to_a_reduced_copy(tmp_path):
    from builder.diagnose.trial import changed_spec

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    tip = rules.Advice("queue-dominates", "tb_onnx_fp32", "...", {"variant_tag": "onnx_fp32"},
                       rules.Change("tb", None, "instances.count", 2))
    data = changed_spec(spec, tip)
    model = data["models"][0]
    assert model["instances"] == {"kind": "cpu", "count": 2, "threads": 1, "gpus": None}
    assert model["variants"] == [{"format": "onnx", "precision": "fp32"}]
    graphs = rules.Advice("launch-bound", "tb_torch_fp32", "...", {}, rules.Change("tb", "torch_fp32", "cuda_graphs", True))
    assert changed_spec(spec, graphs)["models"][0]["variants"] == [{"format": "torch", "precision": "fp32", "cuda_graphs": True}]


@pytest.mark.slow
@pytest.mark.server
def test_try_applies_the_top_suggestion_and_measures_before_and_after(tmp_path):
    """Tiny CPU model, no dynamic batching, one instance: at concurrency 4 requests queue for the one
    instance; --try builds it with two and measures both."""
    from builder.build import build
    from builder.perf.run import run_perf

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "models": [{**TINY["models"][0], "variants": [{"format": "onnx", "precision": "fp32"}]}]}))
    assert not build(spec, tmp_path / "repo").failed
    results = run_perf(tmp_path / "repo", concurrency=(1, 4), measurement_ms=1000, out=tmp_path / "results")
    result = CliRunner().invoke(app, ["profile", str(tmp_path / "repo"), "--results", str(results), "--out",
                                      str(tmp_path / "prof"), "--try", "--batch", "1"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "prof" / "try" / "compare.md").read_text()
    assert text.startswith("Tried: **queue-dominates** on tb_onnx_fp32")
    assert "`models[tb].instances.count: 2`" in text and "Outcome: **" in text
    assert "| tb_onnx_fp32 | 4 |" in text
    changed = yaml.safe_load((tmp_path / "prof" / "try" / "spec.yaml").read_text())
    assert changed["models"][0]["instances"]["count"] == 2
    for run in ("before", "after"):
        assert len(pd.read_csv(tmp_path / "prof" / "try" / run / "results.csv")) == 2


# --------------------------------------------------------------------------- resource sampling during perf

def test_gpu_metrics_from_triton_text():
    from builder.diagnose.usage import parse_gpu_metrics

    # the shape of Triton's Prometheus text for two GPUs (metric names from Triton's docs; values made up)
    text = "\n".join([
        "# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)",
        "# TYPE nv_gpu_utilization gauge",
        'nv_gpu_utilization{gpu_uuid="GPU-a"} 0.5',
        'nv_gpu_utilization{gpu_uuid="GPU-b"} 0.9',
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 1048576000',
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 1048576000',
    ])
    util, mem = parse_gpu_metrics(text)
    assert util == pytest.approx(70.0) and mem == pytest.approx(2000.0)
    assert parse_gpu_metrics("nv_inference_count 3\n") is None  # a CPU server: no GPU metric


def test_sampler_sees_a_busy_process_tree():
    import subprocess
    import sys

    from builder.diagnose.usage import UsageSampler

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with UsageSampler(pid=os.getpid(), metrics_url=None, interval_s=0.2) as sampler:
            time.sleep(1.2)
            used = sampler.take()
    finally:
        child.kill()
        child.wait()
    assert used["server_cpu_pct"] > 30  # the spinning child counts toward its parent's tree
    assert "gpu_util_pct" not in used or used["gpu_util_pct"] >= 0


def test_memory_growth_that_did_not_grow_is_not_printed_as_negative(tmp_path):
    """On the H100 the fp32 peak at batch 64 came out 2.9 MB below batch 1's (allocator caching): a growth per
    batch element of -45 kB is noise, not a number."""
    from builder.diagnose.report import write_profile_report

    runs = [Run(1, 7.8, [], {}, None, None, 709e6, "t1"), Run(64, 38.0, [], {}, None, None, 706e6, "t64")]
    grows = [Run(1, 7.8, [], {}, None, None, 100e6, "t1"), Run(65, 38.0, [], {}, None, None, 164e6, "t65")]
    text = write_profile_report(tmp_path, tmp_path, [vp("cuda", runs=runs), vp("cuda", precision="fp16", runs=grows)],
                                []).read_text()
    memory = text[text.index("## Memory and threads"):]
    assert "not resolved (peak did not grow)" in memory and "-" not in memory.split("\n")[4].split("|")[6]
    assert "1.00 MB" in memory  # (164 - 100) MB over 64 more batch elements
