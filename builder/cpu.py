"""The instruction-set features of the CPU this process runs on, as the kernel reports them.

Quantized and half-precision kernels pick their code path by these (onnxruntime's int8 GEMM saturates
16-bit sums without VNNI; bf16 is fast only with AVX-512 BF16 or AMX), so a verification's result holds
for CPUs with the same features. The manifest records them; `serve` compares them with the serving CPU.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# the features numerics and speed of int8 / fp16 / bf16 kernels depend on (names as /proc/cpuinfo spells them)
RELEVANT = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
            "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")
# the int8 dot-product instructions: without one, x86 int8 GEMMs multiply u8 x s8 pairs into saturating
# 16-bit sums (vpmaddubsw)
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def features() -> tuple[str, ...]:
    """The RELEVANT features this CPU has, sorted; empty where the kernel does not say."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(sorted(f for f in RELEVANT if f in flags))


def describe() -> dict:
    """What the manifest records about the CPU a verification ran on."""
    return {"machine": platform.machine(), "features": list(features())}


def missing(built_with: list[str] | tuple[str, ...], here: tuple[str, ...] | None = None) -> list[str]:
    """The features the build CPU had that this one lacks."""
    have = set(features() if here is None else here)
    return [f for f in built_with if f not in have]


def native_bf16(here: tuple[str, ...] | None = None) -> bool:
    """Whether bf16 matmuls run natively here; without avx512_bf16 / amx_bf16 torch emulates them, slower
    than fp32 (SmolLM2 served in bf16: 1.38x fp32 with avx512_bf16, 0.47x on an AVX2-only CPU)."""
    have = set(features() if here is None else here)
    return bool(have & {"avx512_bf16", "amx_bf16", "bf16"})
