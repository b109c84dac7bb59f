"""Checking a repository's ensembles as Triton would: steps, tensors, dtypes, dims, cycles."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


def check_staged(stage: Path, names: list[str]) -> list[str]:
    from builder.render import parse_config

    configs = {}
    for name in names:
        path = stage / name / "config.pbtxt"
        if path.is_file():
            configs[name] = parse_config(path.read_text(), f"{name}/config.pbtxt")
    return check_ensembles(stage, configs)


@dataclass(frozen=True)
class _Tensor:
    dtype: int
    dims: tuple[int, ...]
    full_dims: tuple[int, ...]  # with the batch axis of a batching model
    where: str  # "ensemble input TEXT" / "step 2 (m) output x"
    step: int = 0  # producing step (0: the ensemble's input)


def _tensor(t, mbs: int, where: str, step: int = 0) -> _Tensor:
    dims = tuple(int(d) for d in t.dims)
    return _Tensor(t.data_type, dims, (-1, *dims) if mbs > 0 else dims, where, step)


def _compatible(a: _Tensor, b: _Tensor) -> bool:
    """As Triton's ensemble check: dims match (-1 matches anything), with or without the batch axis."""
    def same(x, y):
        return len(x) == len(y) and all(p == q or -1 in (p, q) for p, q in zip(x, y))

    return same(a.dims, b.dims) or same(a.full_dims, b.full_dims)


def _dtype(code: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(code)


def check_ensembles(repo: Path, configs: dict) -> list[str]:
    """Every wiring problem of the ensembles among `configs` (name -> parsed ModelConfig), one line each.

    Each step's model exists; every mapped tensor exists in that model's config with the same dtype
    and compatible dims; every tensor a step reads is produced once (by the ensemble's input or an
    earlier step's output); no cycles; every ensemble input is used; every ensemble output produced.
    `repo` tells a missing model from one whose config.pbtxt is there but did not parse.
    """
    problems: list[str] = []
    for name in sorted(configs):
        cfg = configs[name]
        if cfg.platform == "ensemble":
            problems += _check_ensemble(Path(repo), name, cfg, configs)
    return problems


def _check_ensemble(repo: Path, name: str, cfg, configs: dict) -> list[str]:
    problems: list[str] = []
    steps = list(cfg.ensemble_scheduling.step)
    if not steps:
        return [f"{name}: ensemble_scheduling has no step"]
    produced = {t.name: _tensor(t, cfg.max_batch_size, f"ensemble input {t.name}") for t in cfg.input}
    reads: dict[str, list[tuple[str, _Tensor, str]]] = defaultdict(list)  # tensor -> (where, consumer spec, key)
    edges: dict[int, set[int]] = defaultdict(set)
    for index, step in enumerate(steps, 1):
        where = f"{name}: step {index} ({step.model_name})"
        model = configs.get(step.model_name)
        if model is None:
            why = ("has a config.pbtxt that could not be parsed" if (repo / step.model_name / "config.pbtxt").is_file()
                   else "is not in the repository")
            problems.append(f"{where}: model {step.model_name} {why}")
            continue
        if cfg.max_batch_size > 0 and model.max_batch_size < cfg.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size} is below the ensemble's {cfg.max_batch_size}")
        ins = {t.name: t for t in model.input}
        outs = {t.name: t for t in model.output}
        for key, tensor in step.input_map.items():
            if key not in ins:
                problems.append(f"{where}: input_map reads {tensor!r} into input {key!r}, which {step.model_name} "
                                f"does not have (its inputs: {', '.join(ins) or 'none'})")
                continue
            reads[tensor].append((where, _tensor(ins[key], model.max_batch_size, f"input {key}", index), key))
        for t in model.input:
            if t.name not in step.input_map and not t.optional:
                problems.append(f"{where}: input {t.name} of {step.model_name} is not mapped")
        for key, tensor in step.output_map.items():
            if key not in outs:
                problems.append(f"{where}: output_map maps output {key!r} to {tensor!r}, but {step.model_name} has "
                                f"no output {key!r} (its outputs: {', '.join(outs) or 'none'})")
                continue
            if tensor in produced:
                problems.append(f"{where}: output {key} writes tensor {tensor!r}, already written by {produced[tensor].where}")
                continue
            produced[tensor] = _tensor(outs[key], model.max_batch_size, f"step {index} ({step.model_name}) output {key}", index)
    for tensor, uses in reads.items():
        source = produced.get(tensor)
        for where, use, key in uses:
            if source is None:
                problems.append(f"{where}: input {key} reads tensor {tensor!r}, which is neither an ensemble input "
                                f"nor produced by any step")
                continue
            edges[source.step].add(use.step)
            if source.dtype != use.dtype:
                problems.append(f"{where}: input {key} is {_dtype(use.dtype)} but tensor {tensor!r} "
                                f"({source.where}) is {_dtype(source.dtype)}")
            elif not _compatible(source, use):
                problems.append(f"{where}: input {key} has dims {list(use.dims)} but tensor {tensor!r} "
                                f"({source.where}) has dims {list(source.dims)}")
    for t in cfg.output:
        want = _tensor(t, cfg.max_batch_size, f"ensemble output {t.name}")
        source = produced.get(t.name)
        if source is None or source.step == 0:
            problems.append(f"{name}: output {t.name} is produced by no step (no output_map writes {t.name!r})")
        elif source.dtype != want.dtype:
            problems.append(f"{name}: output {t.name} is {_dtype(want.dtype)} but {source.where} is {_dtype(source.dtype)}")
        elif not _compatible(source, want):
            problems.append(f"{name}: output {t.name} has dims {list(want.dims)} but {source.where} has {list(source.dims)}")
    for t in cfg.input:
        if t.name not in reads:
            problems.append(f"{name}: input {t.name} is used by no step")
    cycle = _cycle(edges)
    if cycle:
        names = " -> ".join(f"step {i} ({steps[i - 1].model_name})" for i in cycle)
        problems.append(f"{name}: steps form a cycle: {names}")
    return problems


def _cycle(edges: dict[int, set[int]]) -> list[int]:
    """One cycle among step numbers (0 is the ensemble input), or []."""
    state: dict[int, int] = {}  # 1: on the path, 2: done
    path: list[int] = []

    def visit(node: int) -> list[int]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []
