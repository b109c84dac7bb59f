"""The build cache: finished variants, reused when nothing that made them has changed.

A variant's key is the SHA-256 of everything its directory depends on: the source (file hashes of
a local directory, the inline config, hub id + revision, the factory's module source), the model's
spec section, the variant, the effective serving settings, the runtime, the tool versions and the
builder's own code. An entry holds the finished model directories (every part of the variant:
config.pbtxt, 1/, reference.npz, warmup/) and their manifest entries:

    <root>/v1/<key[:2]>/<key>/entry.json        {"key", "variant", "models": {name: manifest entry}}
    <root>/v1/<key[:2]>/<key>/<triton name>/    the model directory as it was installed

Entries are written to a temporary directory and renamed into place, so a reader never sees half
of one; a hit is checked against the file hashes in its manifest entries and dropped when it does
not match. Only variants that passed verification are stored. The root is $TRITON_BUILDER_CACHE,
else $XDG_CACHE_HOME/triton-builder, else ~/.cache/triton-builder; `--no-cache` bypasses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from builder.errors import UserError
from builder.paths import CACHE_ENV, PROJECT, cache_root
from builder.sources import resolve_source_path

ENV = CACHE_ENV
LAYOUT = "v1"
ENTRY = "entry.json"
CODE_ROOTS = ("builder", "templates")  # the builder's own code: any edit invalidates every entry


def sha256_file(path: Path, memo: dict = {}) -> str:  # noqa: B006 - per-process memo on purpose
    stat = path.stat()
    token = (str(path), stat.st_size, stat.st_mtime_ns)
    if token not in memo:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        memo[token] = digest.hexdigest()
    return memo[token]


def tree_digest(root: Path, skip: tuple[str, ...] = (".git", "__pycache__")) -> str:
    """SHA-256 over the relative paths and contents of every file under `root`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not set(p.relative_to(root).parts) & set(skip)):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def code_digest() -> str:
    return hashlib.sha256("".join(tree_digest(PROJECT / d) for d in CODE_ROOTS).encode()).hexdigest()


def source_fingerprint(spec_path: Path, source) -> dict:
    """What identifies a model's source: file hashes, the inline config, the hub id, the factory's code."""
    if source.config is not None:
        return {"config": source.config}
    if source.hf is not None:
        return {"hf": source.hf, "revision": source.revision}  # unpinned: the hub's current files are not hashed
    if source.factory is not None:
        module = source.factory.split(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        origin = Path(found.origin) if found is not None and found.origin and found.origin != "built-in" else None
        return {"factory": source.factory, "code": sha256_file(origin) if origin and origin.is_file() else None}
    location = resolve_source_path(spec_path, source)  # a model directory, or one GGUF file
    return {source.kind: str(location), "files": sha256_file(location) if location.is_file() else tree_digest(location)}


def _plain(value):
    """Spec values (pydantic models inside dicts) as JSON-able data."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def variant_keys(spec, spec_path: Path, model, runtime: str, tools: dict,
                 names: dict[str, str] | None = None) -> dict[str, str]:
    """variant tag -> cache key, for every variant of `model`; `names`: tag -> the Triton name it is served
    under where that is not derived from the tag alone (a generation model's first variant)."""
    common = {
        "layout": LAYOUT,
        "source": source_fingerprint(spec_path, model.source),
        "model": model.model_dump(mode="json", exclude={"variants", "ensemble"}),
        "serving": _plain(spec.serving(model)),
        "runtime": runtime,
        "tools": tools,
        "code": code_digest(),
    }
    keys = {}
    for variant in model.variants:
        text = json.dumps({**common, "variant": variant.model_dump(mode="json"), "name": (names or {}).get(variant.tag)},
                          sort_keys=True, default=str)
        keys[variant.tag] = hashlib.sha256(text.encode()).hexdigest()
    return keys


@dataclass
class Hit:
    key: str
    path: Path
    models: dict[str, dict]  # triton name -> manifest entry

    def copy_into(self, stage: Path) -> bool:
        """Copy every model directory into `stage`; False (and nothing left there) if one cannot be."""
        try:
            for name in self.models:
                shutil.copytree(self.path / name, stage / name)
        except OSError:  # removed or damaged under us (another build dropped it): a miss
            for name in self.models:
                shutil.rmtree(stage / name, ignore_errors=True)
            return False
        return True


class BuildCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root()

    def _dir(self, key: str) -> Path:
        return self.root / LAYOUT / key[:2] / key

    def lookup(self, key: str) -> Hit | None:
        """The entry for `key` if it is there and intact; a damaged entry is removed (a miss)."""
        path = self._dir(key)
        try:
            data = json.loads((path / ENTRY).read_text())
            models = data["models"]
            for name, entry in models.items():
                for f in entry["files"]:
                    file = path / name / f["path"]
                    if file.stat().st_size != f["bytes"] or sha256_file(file) != f["sha256"]:
                        raise ValueError(f"{name}/{f['path']} changed")
        except FileNotFoundError:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            return None
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(path, ignore_errors=True)
            return None
        return Hit(key, path, models)

    def fetch(self, key: str, stage: Path) -> Hit | None:
        """The entry for `key`, copied into `stage`; None on a miss."""
        hit = self.lookup(key)
        return hit if hit is not None and hit.copy_into(stage) else None

    def store(self, key: str, variant: str, models: dict[str, tuple[Path, dict]]) -> None:
        """Copy finished model directories in under `key` (name -> (directory, manifest entry))."""
        final = self._dir(key)
        if final.exists():
            return
        tmp = self.root / LAYOUT / "tmp" / f"{key}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(parents=True)
            for name, (directory, _) in models.items():
                shutil.copytree(directory, tmp / name)
            (tmp / ENTRY).write_text(json.dumps({"key": key, "variant": variant,
                                                 "models": {n: e for n, (_, e) in models.items()}}, indent=1))
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # another build stored the same key first: fine
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def open_cache(enabled: bool) -> BuildCache | None:
    if not enabled:
        return None
    root = cache_root()
    if root.exists() and not root.is_dir():
        raise UserError(f"{ENV}={root}: not a directory; point it at a directory or use --no-cache")
    return BuildCache(root)
