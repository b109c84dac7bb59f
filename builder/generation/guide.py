"""Guided decoding: a token mask per step from a grammar (xgrammar), for JSON output and forced tool calls.

Copied beside the served model (like engine.py) and imported on the first guided request only, so a model that
never gets one does not load xgrammar. A guide is the engine's `Request.guide`: `mask(row)` limits one row of
logits (in place) to the tokens the grammar allows next, `accept(token)` moves the grammar on. JSON is compact
(no free whitespace): a small model given the choice can otherwise emit whitespace until max_tokens.
"""

from __future__ import annotations

import json

import torch


class Compiler:
    """The model's vocabulary for xgrammar, and compiled grammars by spec (compilation is the slow part)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = tokenizer if hasattr(tokenizer, "get_vocab") and not hasattr(tokenizer, "encode_batch") \
            else PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=list(stop_ids))
        self.xgr = xgr
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size

    def compile(self, spec: dict):
        """spec: {"json_schema": schema} or {"json_object": true}; ValueError for anything else or a bad schema."""
        if isinstance(spec.get("json_schema"), dict):
            schema = spec["json_schema"]
        elif spec.get("json_object"):
            schema = {"type": "object"}
        else:
            raise ValueError('give {"json_schema": {...}} or {"json_object": true}')
        try:
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=False)
        except Exception as exc:  # noqa: BLE001 - xgrammar's errors name what is wrong with the schema
            raise ValueError(f"the JSON schema cannot be used: {str(exc).splitlines()[0]}") from None

    def matcher(self, spec: dict) -> "Guide":
        return Guide(self.xgr, self.xgr.GrammarMatcher(self.compile(spec)), self.vocab_size)


class Guide:
    def __init__(self, xgr, matcher, vocab_size: int):
        self.xgr, self.matcher = xgr, matcher
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, row: torch.Tensor) -> None:
        self.matcher.fill_next_token_bitmask(self.bitmask, 0)
        self.xgr.apply_token_bitmask_inplace(row[None], self.bitmask.to(row.device))

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)
