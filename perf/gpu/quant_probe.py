"""Why int8 weight-only + inductor served slowly at 32 streams (issue 11, H100 call 2 of 2026-11-23: c=1 ITL as
bf16, but TTFT 283 ms and 73 ms a step at c=32): the decode step of a few Llama-3.2-1B-shaped layers, replayed as
CUDA graphs, per precision (bf16, int8, int4) and compile mode (none; inductor with dynamic shapes, as served;
inductor specialized per row count), at 1, 32 and 128 rows (a decode step alone, 32 streams, a prompt chunk),
plus the top GPU kernels of the slow case. Writes JSON lines to --out as it goes (a cut-off call keeps them).

    python perf/gpu/quant_probe.py --out results.jsonl [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

ROWS = (1, 32, 128)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/quant-probe"))
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()

    import torch
    import transformers

    import llm_bench
    import llm_model
    from builder.generation import decoder as D
    from builder.generation import hf2decoder

    torch._dynamo.config.cache_size_limit = 64  # the specialized mode compiles once per row count
    t0 = time.time()
    out = args.out.open("a")

    def emit(row: dict) -> None:
        row["t"] = round(time.time() - t0, 1)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    hf = transformers.AutoModelForCausalLM.from_pretrained(llm_model.make(args.work, args.layers), dtype=torch.bfloat16)
    config, weights = hf2decoder.convert(hf, (0,))
    del hf
    slots, position = 32, 192
    for precision in ("bf16", "int8", "int4"):
        dec = D.Decoder(config, {k: (v if k == "inv_freq" else v.to(torch.bfloat16)).cuda() for k, v in weights.items()})
        if precision != "bf16":
            D.quantize(dec, precision)
        dec.allocate(slots, position + 64)
        modes = {"none": dec.decode, "inductor-dynamic": torch.compile(dec.decode, dynamic=True)}
        if precision != "bf16":
            modes["inductor-static"] = torch.compile(dec.decode, dynamic=False)
        for mode, step in modes.items():
            graphs = D.Graphs(dec, step, max_rows=slots + 128)
            for rows in ROWS:
                try:
                    ms = llm_bench._step_ms("cuda", graphs, torch.randint(1000, 20000, (rows,), device="cuda"),
                                            torch.arange(rows, device="cuda") % slots,
                                            torch.full((rows,), position, device="cuda"), position + 1)
                    emit({"precision": precision, "mode": mode, "rows": rows, "layers": args.layers, "ms": ms})
                except Exception as exc:  # noqa: BLE001 - recorded; the next case runs
                    emit({"precision": precision, "mode": mode, "rows": rows, "error": f"{type(exc).__name__}: {exc}"[:300]})
            if precision == "int8" and mode == "inductor-dynamic":  # the served case: which kernels take the time
                x = (torch.randint(1000, 20000, (128,), device="cuda"), torch.arange(128, device="cuda") % slots,
                     torch.full((128,), position, device="cuda"), position + 1)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step(*x)
                    torch.cuda.synchronize()
                top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:6]
                emit({"precision": precision, "mode": mode, "rows": 128, "top_kernels": [
                    {"name": e.key[:120], "ms_per_step": round(e.self_device_time_total / 3e3, 3), "calls": e.count // 3}
                    for e in top]})
            del graphs
        del dec, modes
        torch.cuda.empty_cache()
    emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
