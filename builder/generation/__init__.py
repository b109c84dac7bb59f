"""Text generation: a causal LM served text in / text out from a KV cache with continuous batching.

Its own path beside the stateless encoder path (families/, convert/): `build_generation` converts the
model into the torch-only decoder of `decoder.py`, checks it against Hugging Face `generate`, and writes
a decoupled python-backend model (templates/python/generator.py + decoder.py + engine.py + weights +
tokenizer.json). The spec, sources, repository, manifest, rendering and runtime are shared.

    entries = build_generation(spec, spec_path, model, stage, console)   # {triton name: manifest entry}
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from builder.errors import RunError, UserError
from builder.signature import Signature, TensorSpec

HERE = Path(__file__).resolve().parent
GENERATOR = HERE.parent.parent / "templates" / "python" / "generator.py"
RUNTIME_FILES = (HERE / "decoder.py", HERE / "engine.py", HERE / "blocks.py")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16"}
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
           ("num_output_tokens", "TYPE_INT32"))
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

    from builder.spec import resolve_source_path

    src, where = model.source, "source"  # the build prefixes models[name]
    if src.config is not None or src.factory is not None:
        raise UserError(f"{where}: generation needs a tokenizer; give path, hf or package (a model directory or "
                        "a .gguf file with its tokenizer), or drop the generation: block to export logits only")
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
    cosines, agree, total = [], 0, 0
    for i, (ids, out, ref) in enumerate(zip(prompt_ids, ref_tokens, ref_logits)):
        with torch.inference_mode():
            got = dec(torch.tensor(ids + out, device=device), [(0, 0, len(ids) + len(out))],
                      list(range(len(ids) - 1, len(ids) + len(out))))
        got = got.cpu()
        cosines.append(float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()))
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
        "min_cosine": round(min(cosines), 6), "greedy_agreement": round(agree / max(total, 1), 4),
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


def build_generation(spec, spec_path: Path, model, stage: Path, console) -> tuple[dict[str, dict], list[dict]]:
    """Build every variant of a generation model into `stage`; returns (manifest entries, per-variant results)."""
    import torch
    from safetensors.torch import save_file

    from builder.generation import decoder as decoder_module
    from builder.generation import hf2decoder
    from builder.repository import checkpoint, file_records
    from builder.spec import LLM_FORMATS

    gen = model.generation
    console.print(f"  loading {model.source.kind} source")
    src = load(spec_path, model)
    config, weights = hf2decoder.convert(src.module, src.eos)
    limit = getattr(src.module.config, "max_position_embeddings", None)
    if limit and gen.max_total_tokens > limit:
        raise UserError(f"generation.max_total_tokens: {gen.max_total_tokens} is above the model's "
                        f"max_position_embeddings ({limit}); lower it")
    window = hf2decoder.window_limit(src.module)
    if window and gen.max_total_tokens > window:
        raise UserError(f"generation.max_total_tokens: {gen.max_total_tokens} is above the model's sliding "
                        f"window ({window}); lower it to {window} or less")
    samples = prompts(src.tokenizer)
    prompt_ids = [ids for _, _, ids in samples]
    console.print(f"  reference: HF generate, greedy, {len(prompt_ids)} prompts x {CHECK_TOKENS} tokens")
    ref_tokens, ref_logits = hf_reference(src.module, prompt_ids, src.eos, CHECK_TOKENS)
    serving = spec.serving(model)
    entries, results = {}, []
    default = next(v for v in model.variants if v.format not in LLM_FORMATS) if any(
        v.format not in LLM_FORMATS for v in model.variants) else None
    for variant in model.variants:
        checkpoint()
        if variant.format in LLM_FORMATS:
            made = render_target(spec_path, model, variant, src, stage, serving)
            entries.update(made)
            results += [{"variant": variant.tag, "name": n, "status": "passed", "step": "render",
                         "message": "rendered, not executed here"} for n in made]
            continue
        name = model.name if variant is default else f"{model.name}_{variant.tag}"
        t0 = time.time()
        if variant.precision == "int4" and not torch.cuda.is_available():
            results.append({"variant": variant.tag, "name": name, "status": "error", "step": "verify", "seconds": 0.0,
                            "message": f"models[{model.name}].variants[{variant.tag}]: torch int4 runs torch's int4 "
                                       "matmul (CUDA only), so it is verified on a GPU; build it on a GPU machine, or "
                                       "use int8 here"})
            console.print(f"  [red]{name}: {results[-1]['message']}[/]")
            continue
        device = "cuda" if torch.cuda.is_available() and serving["instances"].kind == "gpu" else "cpu"
        console.print(f"  {name}: converting ({variant.precision}) and checking against HF generate on {device}")
        result, problems = check(decoder_module, src.tokenizer, config, weights, variant.precision, prompt_ids,
                                 ref_tokens, ref_logits, gen, device=device)
        tol = variant.effective_tolerance
        need_cos = tol.min_cosine if variant.precision != "fp32" else None
        if need_cos is not None and result["min_cosine"] < need_cos:
            problems.append(f"- logits: cosine {result['min_cosine']:.6f} < {need_cos}")
        need_agree = MIN_AGREEMENT[variant.precision]
        if variant.precision != "fp32" and result["greedy_agreement"] < need_agree:
            problems.append(f"- greedy agreement {result['greedy_agreement']:.3f} < {need_agree}")
        status = "failed" if problems else "passed"
        results.append({"variant": variant.tag, "name": name, "status": status, "step": "verify",
                        "message": "\n".join(problems), "seconds": time.time() - t0,
                        "cosine": result["min_cosine"], "agreement": result["greedy_agreement"]})
        if problems:
            console.print(f"  [red]{name}: verification failed[/]\n    " + "\n    ".join(problems))
            continue
        model_dir = stage / name
        version = model_dir / "1"
        version.mkdir(parents=True, exist_ok=True)
        dtype = getattr(torch, TORCH_DTYPES[variant.precision])
        save_file({k: (v if k == "inv_freq" else v.to(dtype)) for k, v in weights.items()}, str(version / "weights.safetensors"))
        (version / "decoder.json").write_text(config.to_json())
        shutil.copy2(GENERATOR, version / "model.py")
        for f in RUNTIME_FILES:
            shutil.copy2(f, version / f.name)
        save_tokenizer(src.tokenizer, version)
        (model_dir / "reference.json").write_text(json.dumps(
            {"prompts": [{"text": text, "add_special_tokens": special} for text, special, _ in samples],
             "texts": result["texts"], "max_tokens": CHECK_TOKENS}, indent=1, ensure_ascii=False))
        parameters = {
            "max_sequences": gen.max_sequences, "max_prompt_tokens": gen.max_prompt_tokens,
            "max_total_tokens": gen.max_total_tokens, "max_tokens": gen.max_tokens, "prefill_chunk": gen.prefill_chunk,
            "stream_interval": gen.stream_interval,
            "precision": variant.precision, "device": serving["instances"].kind,
            "threads": serving["instances"].threads, "artifact": "weights.safetensors", "add_special_tokens": "1",
            "cuda_graphs": int(variant.cuda_graphs), "compile": variant.compile,  # GPU instances only
        }
        write_config(model_dir, name, serving, {k: str(v) for k, v in parameters.items()})
        entries[name] = {
            "role": "variant", "model": model.name, "part": "", "task": model.task, "format": variant.format,
            "precision": variant.precision, "status": status, "source": src.description,
            "signature": signature().to_dict(), "generation": gen.model_dump(), "files": file_records(model_dir),
            "verification": {"passed": True, "tolerance": {"min_cosine": need_cos, "min_agreement": need_agree},
                             **result},
            "reference": "reference.json",
            "command": f"triton-builder build {spec_path} --model {model.name}",
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
        }
    return entries, results


def render_target(spec_path: Path, model, variant, src: Source, stage: Path, serving: dict) -> dict[str, dict]:
    """A TensorRT-LLM or vLLM repository for the same model (builder/targets): render-only here. Local
    sources are saved as a Hugging Face directory inside the model's folder, so the repository is whole."""
    import torch

    from builder.targets import TARGETS

    name = f"{model.name}_{variant.tag}"
    if model.source.hf:
        weights = tokenizer = model.source.hf
    else:
        folder = stage / name / "hf"
        dtype = getattr(torch, TORCH_DTYPES.get(variant.precision, "bfloat16"))
        module = src.module
        # a GGUF checkpoint loads dequantized but keeps a quantizer that refuses to save: save plain weights
        quantizer, module.hf_quantizer = getattr(module, "hf_quantizer", None), None
        quantization = module.config.__dict__.pop("quantization_config", None)
        try:
            module.to(dtype).save_pretrained(folder)
        finally:
            module.to(torch.float32)
            module.hf_quantizer = quantizer
            if quantization is not None:
                module.config.quantization_config = quantization
        src.tokenizer.save_pretrained(folder)
        weights = tokenizer = f"{name}/hf"
    options = {"flow": variant.flow} if variant.format == "tensorrt-llm" else {}
    made = TARGETS[variant.format].render(stage, name=name, weights=weights, tokenizer=tokenizer,
                                          precision=variant.precision, generation=model.generation, serving=serving,
                                          **options)
    from builder.repository import file_records

    return {n: {**e, "model": model.name, "part": "", "task": model.task, "format": variant.format,
                "flow": variant.flow, "generation": model.generation.model_dump(), "status": "rendered", "source": src.description, "files": file_records(stage / n),
                "command": f"triton-builder build {spec_path} --model {model.name}"} for n, e in made.items()}


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


def write_config(model_dir: Path, name: str, serving: dict, parameters: dict) -> None:
    from builder.render import render_template

    text = render_template(
        "generation.pbtxt.j2", f"{name}/config.pbtxt", name=name,
        inputs=[{"name": n, "type": t, "dims": -1 if n == "stop" else 1, "optional": o} for n, t, o in INPUTS],
        outputs=[{"name": n, "type": t, "dims": 1} for n, t in OUTPUTS],
        instance_kind="KIND_GPU" if serving["instances"].kind == "gpu" else "KIND_CPU",
        instance_count=serving["instances"].count, parameters=parameters)
    (model_dir / "config.pbtxt").write_text(text)
