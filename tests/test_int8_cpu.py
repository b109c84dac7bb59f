"""int8 whose numbers do not depend on the CPU, checked on a CPU without VNNI: qemu-user emulates an
AVX2-only EPYC (onnxruntime picks its int8 kernels from CPUID, which qemu answers), whatever this host has."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from builder import cpu
from builder.convert import onnx2int8
from builder.runtime.selfcheck import CheckResult, with_cpu

QEMU = shutil.which("qemu-x86_64")
AVX2_ONLY = "EPYC-Rome"  # AVX2 and FMA, no AVX-512, no VNNI
K, N = 64, 8

RUN = """
import json, sys
import numpy as np
import onnxruntime as ort
x = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
out = {}
for path in sys.argv[1].split(","):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out[path] = session.run(None, {"x": x})[0].tolist()
print(json.dumps(out))
"""


def matmul_model(path):
    """y = x @ W with every weight equal: each u8 x s8 pair of products is as large as it can be, so an
    8-bit weight overflows a 16-bit sum (255 * 127 * 2 > 32767) wherever the kernel adds pairs that way."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((K, N), 0.05, dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def run(paths, x, emulate: bool) -> dict:
    command = [sys.executable, "-c", RUN, ",".join(str(p) for p in paths), json.dumps(x.tolist())]
    if emulate:
        command = [QEMU, "-cpu", AVX2_ONLY, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {k: np.asarray(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.skipif(QEMU is None, reason="needs qemu-user (make setup installs it as root: apt-get install qemu-user)")
def test_default_int8_gives_the_same_numbers_without_vnni(tmp_path):
    src = tmp_path / "fp32.onnx"
    matmul_model(src)
    default, eight_bit = tmp_path / "default.onnx", tmp_path / "s8.onnx"
    onnx2int8.convert(src, default, "dynamic")
    onnx2int8.convert(src, eight_bit, "dynamic", scheme="dynamic-s8")
    x = np.ones((2, K), dtype=np.float32)
    want = x @ np.full((K, N), 0.05, dtype=np.float32)

    here = run([default, eight_bit], x, emulate=False)
    avx2 = run([default, eight_bit], x, emulate=True)

    # the emulated CPU really takes the saturating path: 8-bit weights lose about half the sum there
    assert np.abs(avx2[str(eight_bit)] - want).max() > 0.2 * np.abs(want).max()
    # the default's 7-bit weights cannot overflow: the same numbers on both CPUs, and right
    np.testing.assert_allclose(avx2[str(default)], here[str(default)], rtol=1e-6)
    np.testing.assert_allclose(avx2[str(default)], want, rtol=0.02)
    if any(f in cpu.features() for f in cpu.INT8_DOT):  # a VNNI host computes 8-bit weights right
        np.testing.assert_allclose(here[str(eight_bit)], want, rtol=0.02)


def test_unknown_scheme_for_the_calibration_is_refused(tmp_path):
    src = tmp_path / "fp32.onnx"
    matmul_model(src)
    with pytest.raises(ValueError, match="not a dynamic scheme"):
        onnx2int8.convert(src, tmp_path / "q.onnx", "dynamic", scheme="static-s8")


def test_self_check_names_features_the_serving_cpu_lacks(monkeypatch):
    monkeypatch.setattr(cpu, "features", lambda: ("avx2", "fma"))
    entry = {"precision": "int8", "verification": {"cpu": {"machine": "x86_64", "features": ["avx2", "avx512_vnni"]}}}
    checked = with_cpu(CheckResult("enc_onnx_int8", True, 0.01, 0.9991, "ok"), entry)
    assert checked.cpu_missing == ("avx512_vnni",)
    assert checked.cpu_note == ("verified on a CPU with avx512_vnni, which this one lacks; its reference compared "
                                "here: as built (cosine 0.999100)")
    # fp32 kernels give the same numbers everywhere; an entry built before CPUs were recorded says nothing
    assert with_cpu(CheckResult("x", True), {**entry, "precision": "fp32"}).cpu_missing == ()
    assert with_cpu(CheckResult("x", True), {"precision": "int8", "verification": {}}).cpu_missing == ()


def test_features_come_from_the_kernel():
    have = cpu.features()
    assert set(have) <= set(cpu.RELEVANT)
    assert cpu.describe()["features"] == list(have)
    assert cpu.missing(["avx2", "no_such_feature"], here=("avx2",)) == ["no_such_feature"]


@pytest.mark.parametrize("features, advice", [
    (("avx2", "fma"), "use int8 instead (bf16 too on a GPU; this CPU has no avx512_bf16 or amx_bf16"),
    (("avx2", "avx512_bf16"), "use bf16 (format torch) or int8 instead"),
])
def test_fp16_advice_offers_bf16_only_where_this_cpu_runs_it(monkeypatch, features, advice):
    from builder.diagnose.advice import failing_accuracy

    monkeypatch.setattr(cpu, "features", lambda: features)
    manifest = {"models": {"enc_onnx_fp16": {"model": "enc", "format": "onnx", "precision": "fp16", "status": "failed",
                                             "verification": {"passed": False, "outputs": {"y": {"cosine": 0.97}}}}}}
    [found] = failing_accuracy(manifest, None)
    assert found.message.startswith("enc_onnx_fp16 failed verification (worst cosine 0.970000): " + advice)
