"""The host cost of choosing tokens (`engine.pick`): ATen operators dispatched per call (on a GPU each is a kernel
launch or a copy, ~25-30 µs of host time each on the H100 machine, session 6) and µs per call on this CPU at a
small vocabulary, where dispatch, not arithmetic, is the cost. Compares engine.py with another copy of it.

    python perf/pick_overhead.py [--other OLD_ENGINE.py] [--rows 32] [--vocab 1024]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from builder.generation import engine

CASES = {"greedy": {}, "temperature": {"temperature": 0.8}, "top-p": {"temperature": 0.8, "top_p": 0.95},
         "top-k + top-p": {"temperature": 0.8, "top_p": 0.95, "top_k": 50}}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def measure(module, rows: int, vocab: int, options: dict, rounds: int = 7, calls: int = 200) -> tuple[int, float]:
    logits = torch.randn(rows, vocab)
    reqs = [module.Request([0], 1, emit=None, seed=i, **options) for i in range(rows)]
    positions = list(range(rows))
    with Count() as count:
        module.pick(logits, reqs, positions)
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            module.pick(logits, reqs, positions)
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return count.ops, statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--other", type=Path, help="another engine.py to compare with (e.g. from git show)")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(1)
    modules = {"this": engine}
    if args.other:
        spec = importlib.util.spec_from_file_location("other_engine", args.other)
        modules["other"] = sys.modules["other_engine"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules["other"])
    print(f"{args.rows} rows, vocabulary {args.vocab}: ATen ops per call, µs per call (median of 7 x 200)")
    for case, options in CASES.items():
        cells = []
        for name, module in modules.items():
            ops, us = measure(module, args.rows, args.vocab, options)
            cells.append(f"{name}: {ops} ops, {us:.0f} µs")
        print(f"  {case:14s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
