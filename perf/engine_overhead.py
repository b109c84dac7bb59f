"""The generation engine's own Python work per step, the model replaced by fixed logits: what each streaming row
costs the host besides the GPU step and the responses (issue 11). Uses a tiny random llama (tests/tiny_llm.py).

    python perf/engine_overhead.py [--rows 1,8,32] [--steps 50] [--engine OLD_ENGINE.py]

--engine times another copy of builder/generation/engine.py (e.g. `git show REV:builder/generation/engine.py`),
for a before/after on the same machine: alternate the two runs, this machine's spread is ±30 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> int:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builder.generation import hf2decoder
    from builder.generation.decoder import Decoder
    from tiny_llm import make_model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--engine", type=Path, help="an engine.py to time instead of builder/generation/engine.py")
    args = p.parse_args()
    if args.engine:
        import importlib.util

        spec = importlib.util.spec_from_file_location("engine_under_test", args.engine)
        eng = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(eng)
    else:
        from builder.generation import engine as eng
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model_dir(Path(tmp) / "tiny", "llama")
        hf_tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
        # the tokenizer the served model uses (templates/python/generator.py): the `tokenizers` one from
        # tokenizer.json; transformers' wrapper costs ~4x more per decode (before session 4 this script used it)
        tok = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    config, weights = hf2decoder.convert(model, (hf_tok.eos_token_id,))
    ids = tok.encode("Triton serves models").ids
    clean = [t for t in range(3, config.vocab_size) if (text := tok.decode([t])).strip() and "\ufffd" not in text][:16]
    for rows in (int(r) for r in args.rows.split(",")):
        engine = eng.Engine(Decoder(config, weights), tok, max_sequences=rows, max_total_tokens=1024, prefill_chunk=512)
        # no model: the engine alone. The logits pick whole-text tokens, a different one each step (fixed random
        # logits picked one token per row forever; where that was a partial UTF-8 byte, the detokenizer's window
        # never closed and its decodes grew with the output: ~26 µs each instead of ~1)
        table = [torch.full((rows, config.vocab_size), -1.0).index_fill_(1, torch.tensor([t]), 1.0) for t in clean]
        engine.decode_step = lambda t, s, p, n: table[engine.steps % len(table)][: t.shape[0]]  # noqa: E731
        for _ in range(rows):
            engine.submit(eng.Request(ids, 5 * args.steps + 20, emit=lambda o: None, stream=True, ignore_eos=True))
        for _ in range(5):
            engine.step()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                engine.step()
            samples.append((time.perf_counter() - t0) / args.steps * 1e6)
        print(f"{rows:4d} streaming rows: {statistics.median(samples):7.0f} µs per step (median of 5 x {args.steps}); "
              f"{engine.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
