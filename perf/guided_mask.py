"""What guided decoding costs per step on this machine: the xgrammar mask of one row (fill + apply), over the
tokens of a JSON answer to a schema, with a served model's own tokenizer and vocabulary.

    python perf/guided_mask.py build/llm_repository/smollm/1
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "builder" / "generation"))
import guide  # noqa: E402 - the module copied beside served models

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                           "population": {"type": "integer"}},
          "required": ["city", "country", "population"], "additionalProperties": False}
ANSWER = '{"city": "Paris", "country": "France", "population": 2148000}'


def main(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    config = json.loads((model_dir / "decoder.json").read_text())
    vocab = config.get("vocab_size") or tokenizer.get_vocab_size()
    t0 = time.perf_counter()
    compiler = guide.Compiler(tokenizer, vocab, config.get("eos_token_ids") or [0])
    t1 = time.perf_counter()
    matcher = compiler.matcher({"json_schema": SCHEMA})
    t2 = time.perf_counter()
    row, times = torch.randn(vocab), []
    for token in tokenizer.encode(ANSWER, add_special_tokens=False).ids:
        logits = row.clone()
        start = time.perf_counter()
        matcher.mask(logits)
        times.append(time.perf_counter() - start)
        matcher.accept(token)
    print(f"vocabulary {vocab}: tokenizer index {1e3 * (t1 - t0):.0f} ms (once per model), schema compiled in "
          f"{1e3 * (t2 - t1):.1f} ms; mask per step over {len(times)} steps: p50 {1e6 * statistics.median(times):.0f} "
          f"µs, max {1e6 * max(times):.0f} µs")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
