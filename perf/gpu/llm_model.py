"""A Llama-3.2-1B- or Llama-3.1-8B-shaped causal LM with random weights and a tokenizer that covers its whole vocabulary, saved
as a Hugging Face directory: what the GPU LLM bench serves (the GPU machine reaches no model hub).

Shapes (SHAPES): 1b (Llama 3.2 1B): vocab 128256, hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
tied embeddings; 8b (Llama 3.1 8B): hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, an lm_head of
its own. Both rope llama3 scaling; the weights are made on the device given (bf16) and saved from there. The embeddings are scaled up from the default init so logits are peaked (greedy
ties are rare and low-precision agreement means something); every id decodes to non-empty text, so each
generated token is one streamed piece.

    python perf/gpu/llm_model.py OUT_DIR [--shape 1b|8b] [--layers N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

VOCAB = 128256
SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64, tie_word_embeddings=True),
          "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, head_dim=128,
                     tie_word_embeddings=False)}
CORPUS = ["Triton serves models from a repository on disk. The quick brown fox jumps over the lazy dog. "
          "Continuous batching lets a request join the running batch at the next step. " * 4]


def make(out: Path, layers: int | None = None, shape: str = "1b", device: str = "cpu") -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([f" w{i}" for i in range(tok.get_vocab_size(), VOCAB)])  # every id decodes to text
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    fast.save_pretrained(out)
    dims = dict(SHAPES[shape])
    if layers:
        dims["num_hidden_layers"] = layers
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, **dims,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # an 8B model's init takes minutes on a CPU, seconds on the GPU
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)  # peaked logits (tied head)
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--layers", type=int, default=None, help="default: the shape's")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    print(make(a.out, a.layers, a.shape, a.device))
