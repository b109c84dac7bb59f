"""What the LLM backend targets share: where weights live in the container, config rendering, and
the lints of what users get wrong with these backends (each one line, each a UserError).

Nothing here runs an engine: there is no GPU, TensorRT-LLM or vLLM in this workplace.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from builder.errors import RunError, UserError
from builder.render import environment, parse_config

MODEL_REPOSITORY = "/models"  # where the repository is mounted in the container (builder.runtime.docker)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(repo: Path, path: str, *, where: str, model_repository: str = MODEL_REPOSITORY) -> str:
    """A path the server opens: `path` relative to the repository root becomes its path in the container;
    anything not in the repository must be a hub id (owner/name)."""
    if (Path(repo) / path).exists():
        return f"{model_repository.rstrip('/')}/{path}"
    if HUB_ID.match(path):
        return path
    raise UserError(f"{where}: {path!r} is neither a path inside the repository ({repo}) nor a hub id "
                    "(owner/name); copy the weights into the repository or give a hub id")


def write_config(path: Path, template: str, **values) -> str:
    """Render a config.pbtxt from templates/llm/, parse it back with Triton's schema, write it."""
    text = environment().get_template(template).render(**values)
    parse_config(text, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def read_config(path: Path):
    if not path.is_file():
        raise UserError(f"{path}: missing; rebuild the repository")
    try:
        return parse_config(path.read_text(), str(path))
    except RunError as exc:
        raise UserError(str(exc)) from None


def params(cfg) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def files_under(root: Path, model: str) -> list[str]:
    return sorted(str(p.relative_to(root / model)) for p in (root / model).rglob("*") if p.is_file())


# --- lints: what users of these backends get wrong (tensorrtllm_backend / TensorRT-LLM issues) ---

def lint_streaming(where: str, decoupled: bool) -> None:
    """tensorrtllm_backend #626: streaming responses need the decoupled transaction policy."""
    if not decoupled:
        raise UserError(f"{where}: decoupled is false, so streaming requests (stream: true) fail; these targets "
                        "always stream: set decoupled true (rebuild the repository)")


def lint_prompt_limit(where: str, max_prompt_tokens: int, max_input_len: int) -> None:
    """tensorrtllm_backend #141: prompts longer than the engine's max_input_len are rejected at request time."""
    if max_input_len < max_prompt_tokens:
        raise UserError(f"{where}: the engine's max_input_len is {max_input_len} but generation.max_prompt_tokens "
                        f"is {max_prompt_tokens}; rebuild the engine with --max_input_len {max_prompt_tokens} or "
                        "lower max_prompt_tokens")


def lint_sequence_limit(where: str, max_total_tokens: int, max_seq_len: int) -> None:
    if max_seq_len < max_total_tokens:
        raise UserError(f"{where}: the engine's max_seq_len is {max_seq_len} but generation.max_total_tokens is "
                        f"{max_total_tokens}; rebuild the engine with --max_seq_len {max_total_tokens}")


def lint_beam_width(where: str, config_beam_width: int, engine_beam_width: int) -> None:
    """tensorrtllm_backend #154: max_beam_width in config.pbtxt must match the engine's."""
    if config_beam_width != engine_beam_width:
        raise UserError(f"{where}: parameters.max_beam_width is {config_beam_width} but the engine was built with "
                        f"max_beam_width {engine_beam_width}; requests with another beam_width fail; rebuild the "
                        "repository so both agree")


def lint_world_size(where: str, tp: int, pp: int, *, world_size: int | None = None, gpus: int | None = None) -> None:
    """TensorRT-LLM #1047: world_size = tensor_parallel x pipeline_parallel, and that many GPUs."""
    need = tp * pp
    if world_size is not None and world_size != need:
        raise UserError(f"{where}: the engine's world_size is {world_size} but tensor_parallel x pipeline_parallel "
                        f"is {tp} x {pp} = {need}; rebuild the engine with --tp_size {tp} --pp_size {pp}")
    if gpus is not None and gpus < need:
        raise UserError(f"{where}: needs {need} GPUs (tensor_parallel {tp} x pipeline_parallel {pp}) but {gpus} "
                        f"{'is' if gpus == 1 else 'are'} visible; lower generation.tensor_parallel/pipeline_parallel "
                        "or serve on a larger machine")


def lint_engine_version(where: str, built_with: str, serving: str | None, image: str | None = None) -> None:
    """tensorrtllm_backend #531, #190: an engine loads only in the TensorRT-LLM version that built it."""
    if serving is not None and built_with != serving:
        in_image = f" ({image})" if image else ""
        raise UserError(f"{where}: engine built with TensorRT-LLM {built_with}, the server{in_image} has "
                        f"{serving}; rebuild the engine in the serving image (variants are built inside it)")


def token_ids(tokenizer_dir: Path, where: str) -> dict:
    """end_id / pad_id the way TensorRT-LLM's preprocessing derives them (pad falls back to eos), and the
    other end-of-sequence ids generation_config.json lists (TensorRT-LLM #250, #722: generation that never
    stops). A tokenizer without an eos token is refused."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: cannot load a tokenizer from {tokenizer_dir} ({exc}); give a directory with "
                        "tokenizer files") from None
    if tok.eos_token is None:
        raise UserError(f"{where}: the tokenizer in {tokenizer_dir} has no eos token, so generation never stops "
                        "before max_tokens (end_id); set eos_token in tokenizer_config.json")
    end_id = tok.convert_tokens_to_ids(tok.eos_token)
    pad_from_eos = tok.pad_token is None
    pad_id = end_id if pad_from_eos else tok.convert_tokens_to_ids(tok.pad_token)
    listed = []
    gen = Path(tokenizer_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        listed = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return {"end_id": int(end_id), "pad_id": int(pad_id), "pad_from_eos": pad_from_eos,
            "other_end_ids": sorted(int(i) for i in listed if i != end_id)}
