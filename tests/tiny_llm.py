"""Tiny causal LMs saved as real Hugging Face directories (config, safetensors, a trained byte-level BPE
tokenizer without a pad token), for the generation tests. Random weights: their text is gibberish, which
is what exercises multi-byte pieces and stop strings."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Triton serves models from a repository on disk.",
    "Ünïcödé text, emoji 🚀🚀 and ç, é, è, 日本語 are tokenized too.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Continuous batching lets a request join the running batch at the next step.",
]

ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=8),
    "qwen3": dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=4096),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0),
}


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def make_tokenizer(path: Path, chat: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")  # no pad token
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0, chat: bool = False) -> Path:
    """A saved tiny model of `arch` with its tokenizer; returns the directory."""
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path, chat)
    settings = dict(ARCHS[arch])
    kind = settings.pop("model_type")
    config = transformers.AutoConfig.for_model(kind, vocab_size=len(tok), max_position_embeddings=512,
                                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **settings)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the init: peaked logits, so greedy ties are rare
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(path)
    return path


def spec_text(model_dir: Path, name: str = "tiny", variants: str = "[{format: torch, precision: fp32}]",
              generation: str = "{max_sequences: 2, max_prompt_tokens: 64, max_total_tokens: 128, max_tokens: 16, prefill_chunk: 8}") -> str:
    return (f"models:\n  - name: {name}\n    task: text-generation\n    source: {{path: {model_dir}}}\n"
            f"    generation: {generation}\n    variants: {variants}\n")


def build_cli(tmp: Path, spec: str):
    """Write `spec` to tmp/spec.yaml and run `triton-builder build` into tmp/repo: (the CLI result, the repo)."""
    from typer.testing import CliRunner

    from builder.cli import app

    (tmp / "spec.yaml").write_text(spec)
    repo = tmp / "repo"
    return CliRunner().invoke(app, ["build", str(tmp / "spec.yaml"), "-o", str(repo)]), repo
