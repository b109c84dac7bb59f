"""Text generation: a causal LM served text in / text out from a KV cache with continuous batching.

What the build needs of it beside the encoder path's families: `prepare` loads the model (a directory, a
GGUF file, a package or the hub), converts it into the torch-only decoder of `decoder.py` and runs HF
`generate` on real prompts; `check` verifies a variant's decoder against that. The variants themselves go
through the same Job / format record / cache / manifest as every other model (builder.build): the
generation endpoint's formats are builder/formats/generator.py (ours: templates/python/generator.py +
decoder.py + engine.py + weights + tokenizer.json) and builder/formats/llm.py (TensorRT-LLM, vLLM).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from builder.errors import RunError, UserError
from builder.paths import python_template
from builder.signature import Signature, TensorSpec

HERE = Path(__file__).resolve().parent
GENERATOR = HERE.parent.parent / "templates" / "python" / "generator.py"
RUNTIME_FILES = (HERE / "decoder.py", HERE / "paged_kernel.py", HERE / "engine.py", HERE / "blocks.py", HERE / "guide.py")
TORCH_DTYPES = python_template("backend_common").TORCH_DTYPES  # precision -> torch dtype, as served
# greedy tokens that must agree with the fp32 reference (teacher-forced), per precision
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.85, "int8": 0.85, "int4": 0.7}
CHECK_TOKENS = 16  # new tokens per verification prompt
PERPLEXITY_TEXT = (  # a fixed text for the perplexity of each variant (the same for every model and precision)
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books far "
    "faster than scribes. Within fifty years, presses were at work in more than two hundred European cities, "
    "and millions of volumes had been printed. The spread of printed material changed how knowledge moved: "
    "scientists could compare results, reformers could reach wide audiences, and readers everywhere could own "
    "texts that had once been rare and expensive.")
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "Écris une phrase en français avec des accents: é, è, ç.",
)

# name, Triton type, optional: the interface of Triton's TensorRT-LLM and vLLM backends (+ ignore_eos,
# add_special_tokens); dims [1], no batch dimension (max_batch_size 0)
INPUTS = (("text_input", "TYPE_STRING", False), ("max_tokens", "TYPE_INT32", True), ("stream", "TYPE_BOOL", True),
          ("temperature", "TYPE_FP32", True), ("top_p", "TYPE_FP32", True), ("top_k", "TYPE_INT32", True),
          ("seed", "TYPE_UINT64", True), ("stop", "TYPE_STRING", True), ("ignore_eos", "TYPE_BOOL", True),
          ("add_special_tokens", "TYPE_BOOL", True))
OUTPUTS = (("text_output", "TYPE_STRING"), ("finish_reason", "TYPE_STRING"), ("num_input_tokens", "TYPE_INT32"),
           ("num_output_tokens", "TYPE_INT32"),
           ("token_info", "TYPE_STRING"))  # JSON [[id, logprob, [[id, logprob], ...]], ...]: only when asked (logprobs)
NUMPY = {"TYPE_STRING": "bytes", "TYPE_INT32": "int32", "TYPE_BOOL": "bool", "TYPE_FP32": "float32",
         "TYPE_UINT64": "uint64"}


@dataclass
class Source:
    """What the build needs of a causal LM: the HF module, its tokenizer and where they came from."""

    module: object
    tokenizer: object  # a transformers fast tokenizer
    description: str
    eos: tuple[int, ...]


def signature() -> Signature:
    def spec(name, kind):
        return TensorSpec(name, NUMPY[kind], (1,), kind="text" if kind == "TYPE_STRING" else "float")

    return Signature(tuple(spec(n, k) for n, k, _ in INPUTS), tuple(spec(n, k) for n, k in OUTPUTS), 0,
                     {"decoupled": True})


def load(spec_path: Path, model) -> Source:
    """The fp32 HF causal LM and its fast tokenizer, from a directory, a GGUF file, a package or the hub."""
    import torch
    import transformers

    from builder.sources import resolve_source_path

    src, where = model.source, "source"  # the build prefixes models[name]
    if src.config is not None or src.factory is not None:
        raise UserError(f"{where}: generation needs a tokenizer; give path, hf or package (a model directory or "
                        "a .gguf file with its tokenizer), or write generation: false to export logits only")
    location = src.hf if src.hf else resolve_source_path(spec_path, src)
    kwargs: dict = {"dtype": torch.float32}
    if isinstance(location, Path) and location.is_file():  # GGUF: weights and tokenizer in one file
        kwargs["gguf_file"], location = location.name, location.parent
    if src.hf:
        kwargs["revision"] = src.revision
    else:
        kwargs["local_files_only"] = True
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(location), **{k: v for k, v in kwargs.items() if k != "dtype"})
        module = transformers.AutoModelForCausalLM.from_pretrained(str(location), **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        hint = "pip install gguf accelerate" if "gguf" in str(exc).lower() else \
            "the directory needs config.json, weights and tokenizer files"
        raise UserError(f"{where}: cannot load {location}: {str(exc).splitlines()[0]} ({hint})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{where}: {location} has no fast tokenizer (tokenizer.json); the served model needs one")
    gen = getattr(module, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    name = kwargs.get("gguf_file") or src.kind
    return Source(module.eval(), tokenizer, f"{src.kind}: {location}" + (f" ({name})" if "gguf_file" in kwargs else ""),
                  tuple(sorted(eos)))


def prompts(tokenizer) -> list[tuple[str, bool, list[int]]]:
    """Real prompts as the server will get them: (text, add_special_tokens, ids); through the chat
    template when the tokenizer has one (its text carries the special tokens already)."""
    out = []
    for text in PROMPTS:
        special = not getattr(tokenizer, "chat_template", None)
        if not special:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        out.append((text, special, list(tokenizer(text, add_special_tokens=special)["input_ids"])))
    return out


def hf_reference(module, prompt_ids: list[list[int]], eos: tuple[int, ...], new_tokens: int):
    """HF `generate` greedy tokens per prompt (each alone), and the fp32 logits along them (teacher forcing)."""
    import torch

    tokens, logits = [], []
    pad = eos[0] if eos else 0
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            out = module.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=list(eos) or None, pad_token_id=pad)[0, len(ids):].tolist()
            while out and out[-1] in eos:  # the end token (and padding after it) is not text
                out.pop()
            tokens.append(out)
            full = torch.tensor([ids + out])
            logits.append(module(full).logits[0, len(ids) - 1:len(ids) + len(out)].float())
    return tokens, logits


def check(decoder_module, tokenizer, config, weights, precision: str, prompt_ids, ref_tokens, ref_logits,
          generation, device: str = "cpu") -> dict:
    """Greedy equality (fp32) or logits cosine + greedy agreement (lower precisions) against HF, and
    continuous batching: every prompt decoded together with the others gives exactly its solo answer."""
    import torch

    from builder.generation import engine as eng

    dtype = getattr(torch, TORCH_DTYPES[precision])
    cast = {k: v.to(device=device, dtype=None if k == "inv_freq" else dtype) for k, v in weights.items()}
    dec = decoder_module.Decoder(config, cast)
    if precision in ("int8", "int4"):
        decoder_module.quantize(dec, precision)
    slots = max(len(prompt_ids), 1)
    longest = max(len(p) + len(t) for p, t in zip(prompt_ids, ref_tokens)) + 2
    engine = eng.Engine(dec, tokenizer, max_sequences=slots, max_total_tokens=max(longest, CHECK_TOKENS * 8 + 1),
                        prefill_chunk=min(generation.prefill_chunk, 8))  # small chunks: chunked prefill is checked too
    cosines, agree, total, max_abs = [], 0, 0, 0.0
    for i, (ids, out, ref) in enumerate(zip(prompt_ids, ref_tokens, ref_logits)):
        with torch.inference_mode():
            got = dec(torch.tensor(ids + out, device=device), [(0, 0, len(ids) + len(out))],
                      list(range(len(ids) - 1, len(ids) + len(out))))
        got = got.cpu()
        cosines.append(float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()))
        max_abs = max(max_abs, float((got.float() - ref).abs().max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(out) + 1
    with torch.inference_mode():  # perplexity on a fixed text, teacher-forced: the quantization cost in one number
        ids = tokenizer(PERPLEXITY_TEXT, add_special_tokens=False)["input_ids"][:CHECK_TOKENS * 8]
        logits = dec(torch.tensor(ids, device=device), [(0, 0, len(ids))], list(range(len(ids) - 1))).cpu()
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    solo = [eng.generate(engine, [ids], CHECK_TOKENS)[0] for ids in prompt_ids]
    together = eng.generate(engine, prompt_ids, CHECK_TOKENS)
    exact = [o.token_ids == t for o, t in zip(solo, ref_tokens)]
    batching = [a.token_ids == b.token_ids and a.text == b.text for a, b in zip(solo, together)]
    result = {
        "prompts": len(prompt_ids), "new_tokens": CHECK_TOKENS,
        "min_cosine": round(min(cosines), 6), "max_abs": max_abs, "greedy_agreement": round(agree / max(total, 1), 4),
        "nll_per_token": round(float(nll), 4),  # perplexity = exp(nll); None where that overflows (random weights)
        "perplexity": round(float(torch.exp(nll)), 4) if float(nll) < 30 else None,
        "greedy_equal_to_hf": sum(exact), "continuous_batching_equal": sum(batching),
        "texts": [o.text for o in solo], "reference_texts": [tokenizer.decode(t, skip_special_tokens=True) for t in ref_tokens],
    }
    problems = []
    if precision == "fp32" and not all(exact):
        first = exact.index(False)
        problems.append(f"- greedy text differs from HF generate on prompt {first}: "
                        f"{result['texts'][first]!r} vs {result['reference_texts'][first]!r}")
    # exact only in fp32: bf16/fp16 kernels round differently at different batch shapes (not batch invariant), so
    # there a near-tie may flip a token; the count is reported
    if precision == "fp32" and not all(batching):
        first = batching.index(False)
        problems.append(f"- continuous batching changed prompt {first}'s answer: {together[first].text!r} vs solo "
                        f"{solo[first].text!r}")
    return result, problems


@dataclass(frozen=True)
class Prepared:
    """A causal LM ready for its variants (the `part` of their builder.build.Job): the HF source, its
    conversion into the decoder, the verification prompts and HF generate's answers to them."""

    source: Source
    config: object  # decoder.DecoderConfig
    weights: dict  # fp32 decoder weights
    prompts: tuple  # (text, add_special_tokens, ids) per prompt
    ref_tokens: tuple  # HF generate's greedy tokens per prompt
    ref_logits: tuple  # fp32 logits along them (teacher-forced)
    generation: object = None  # the spec's generation block, unset limits fitted to the model
    suffix: str = ""  # one part, named after the model


def prepare(spec_path: Path, model, console) -> Prepared:
    """Load the model, convert it for the decoder, check the generation limits against it and run the
    HF reference: what every variant of `model` is built and verified from."""
    from builder.generation import hf2decoder

    src = load(spec_path, model)
    config, weights = hf2decoder.convert(src.module, src.eos)
    limit = getattr(src.module.config, "max_position_embeddings", None)
    window = hf2decoder.window_limit(src.module)
    gen = fit_limits(model.generation, min((n for n in (limit, window) if n), default=None))
    if limit and gen.max_total_tokens > limit:
        raise UserError(f"generation.max_total_tokens: {gen.max_total_tokens} is above the model's "
                        f"max_position_embeddings ({limit}); lower it")
    if window and gen.max_total_tokens > window:
        raise UserError(f"generation.max_total_tokens: {gen.max_total_tokens} is above the model's sliding "
                        f"window ({window}); lower it to {window} or less")
    samples = prompts(src.tokenizer)
    prompt_ids = [ids for _, _, ids in samples]
    console.print(f"  reference: HF generate, greedy, {len(prompt_ids)} prompts x {CHECK_TOKENS} tokens")
    ref_tokens, ref_logits = hf_reference(src.module, prompt_ids, src.eos, CHECK_TOKENS)
    return Prepared(src, config, weights, tuple(samples), tuple(ref_tokens), tuple(ref_logits), gen)


def fit_limits(gen, cap: int | None):
    """The generation block with the limits the spec left unset lowered to what the model can hold (`cap`:
    its positions or sliding window); a limit the spec gives is kept (and refused when it does not fit)."""
    given = gen.model_fields_set
    if not cap or gen.max_total_tokens <= cap or "max_total_tokens" in given:
        return gen
    prompt = gen.max_prompt_tokens if "max_prompt_tokens" in given else min(gen.max_prompt_tokens, cap // 2)
    tokens = gen.max_tokens if "max_tokens" in given else min(gen.max_tokens, cap - prompt)
    return gen.model_copy(update={"max_total_tokens": cap, "max_prompt_tokens": prompt, "max_tokens": tokens})


def save_tokenizer(tokenizer, version: Path) -> None:
    """tokenizer.json (what the server loads with `tokenizers`) and tokenizer_config.json (chat template)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (Path(tmp) / name).is_file():
                shutil.copy2(Path(tmp) / name, version / name)
    if not (version / "tokenizer.json").is_file():
        raise RunError("the tokenizer did not save a tokenizer.json")
