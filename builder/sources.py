"""Loading a model from a spec's `source`: a local directory, a hub id, an inline config or a factory."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.errors import RunError, UserError

if TYPE_CHECKING:
    from builder.spec import Model, Source

@dataclass
class Loaded:
    module: Any  # torch.nn.Module in eval mode, fp32
    config: Any | None  # transformers PretrainedConfig (None for factory sources)
    files_dir: Path | None  # where tokenizer / image processor files are (None: random init, no files)
    example_inputs: dict | None = None  # factory sources only
    description: str = ""
    extra: dict = field(default_factory=dict)


def load_source(spec_path: Path, model: Model) -> Loaded:
    import torch
    import transformers

    src = model.source
    if src.factory is not None:
        return _load_factory(src.factory, model.name)
    from builder.families import auto_class

    auto = getattr(transformers, auto_class(model.task))
    # eager attention exports cleanly (sdpa is chosen again for torch variants); fp32 whatever dtype the
    # checkpoint was saved in: it is the reference every variant is checked against
    kwargs = {"attn_implementation": "eager", "dtype": torch.float32}
    if src.config is not None:
        cfg_dict = dict(src.config)
        model_type = cfg_dict.pop("model_type")
        try:
            config = transformers.AutoConfig.for_model(model_type, **cfg_dict)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"models[{model.name}].source.config: {exc}") from None
        torch.manual_seed(0)
        name_architecture(auto, config)
        try:
            module = auto.from_config(config, **kwargs)
        except ValueError as exc:
            raise UserError(f"models[{model.name}].source.config: model_type {model_type!r} does not fit task "
                            f"{model.task} ({str(exc).splitlines()[0]})") from None
        return Loaded(module.eval(), config, None, description=f"random init from config ({model_type})")
    if src.hf is not None:
        where: str | Path = src.hf
        files_dir = None
    else:
        where = resolve_source_path(spec_path, src)
        files_dir = where
    try:
        module = auto.from_pretrained(where, revision=src.revision, **kwargs) if src.hf else \
            auto.from_pretrained(where, local_files_only=True, **kwargs)
    except OSError as exc:
        hint = "check the id and your network" if src.hf else "the directory needs config.json and weights"
        raise UserError(f"models[{model.name}].source: cannot load {where}: {str(exc).splitlines()[0]} ({hint})") from None
    except ValueError as exc:
        raise UserError(f"models[{model.name}].source: {where} does not fit task {model.task}: "
                        f"{str(exc).splitlines()[0]}") from None
    if src.hf:
        from huggingface_hub import snapshot_download

        files_dir = Path(snapshot_download(src.hf, revision=src.revision,
                                           allow_patterns=["*.json", "*.txt", "*.model"]))
    return Loaded(module.eval(), module.config, files_dir, description=f"{src.kind}: {where}")


def name_architecture(auto, config) -> None:
    """Auto classes that map one config type to several model classes (DeiT: with and without the
    distillation head) pick one by `config.architectures`; a bare config has none. Name the first."""
    if getattr(config, "architectures", None):
        return
    try:
        classes = auto._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return
    if isinstance(classes, (list, tuple)) and classes:
        config.architectures = [classes[0].__name__]


def _load_factory(ref: str, name: str) -> Loaded:
    mod_name, fn_name = ref.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"models[{name}].source.factory: cannot import {ref}: {exc}") from None
    try:
        module, example = fn()
    except Exception as exc:  # user code: report what failed and where
        raise RunError(f"models[{name}].source.factory: {ref}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(example, dict) or not example:
        raise UserError(f"models[{name}].source.factory: {ref}() must return (module, {{input name: example tensor}})")
    return Loaded(module.eval(), None, None, example_inputs=example, description=f"factory {ref}")


def offline_env() -> None:
    """Local sources never reach the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_source_path(spec_path: Path, source: Source) -> Path | None:
    """The local directory a path/package source points to, or None for other kinds."""
    if source.path is not None:
        return (Path(spec_path).parent / source.path).resolve()
    if source.package is not None:
        pkg, _, sub = source.package.partition("/")
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"source.package: Python package {pkg!r} is not installed; pip install it "
                            f"(e.g. pip install {pkg.replace('_', '-')})")
        root = Path(list(found.submodule_search_locations)[0]) / sub
        if not (root.is_dir() or (root.is_file() and root.suffix == ".gguf")):
            raise UserError(f"source.package: {root} is not a directory or a .gguf file inside {pkg}")
        return root
    return None
