"""The serving-configuration space of one variant and the order `tune` searches it in (no server here:
builder.perf.tune measures what this proposes). A configuration is `Settings`, read from and written into a
parsed config.pbtxt; `grids` are each axis's values around the default; `search` proposes the next candidate
from the scores so far (see builder.perf.tune for the strategy)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from builder.render import parse_config, preferred_batch_sizes

INSTANCE_STEPS = (1, 2, 3, 4, 6, 8)
BATCH_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DELAY_STEPS_US = (0, 100, 500, 2000, 10000)
AXES = ("instances", "queue_delay_us", "max_batch_size", "preferred")


@dataclass(frozen=True)
class Settings:
    """One serving configuration. queue_delay_us None: the model has no dynamic batcher (only
    instances are tuned)."""

    instances: int
    max_batch_size: int
    preferred: tuple[int, ...]
    queue_delay_us: int | None

    def normal(self) -> "Settings":
        """The same configuration as it is rendered (preferred sizes the batcher can form, or none)."""
        return replace(self, preferred=tuple(preferred_batch_sizes(self.preferred, self.max_batch_size)))

    def label(self) -> str:
        parts = [f"{self.instances} instance{'s' if self.instances > 1 else ''}"]
        if self.queue_delay_us is not None:
            parts += [f"max batch {self.max_batch_size}",
                      f"preferred {list(self.preferred) if self.preferred else 'none'}",
                      f"delay {self.queue_delay_us} µs"]
        return ", ".join(parts)


def settings_of(cfg) -> Settings:
    """The serving settings of a parsed ModelConfig."""
    batching = cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching")
    db = cfg.dynamic_batching
    return Settings(instances=(cfg.instance_group[0].count or 1) if cfg.instance_group else 1,
                    max_batch_size=cfg.max_batch_size,
                    preferred=tuple(db.preferred_batch_size) if batching else (),
                    queue_delay_us=int(db.max_queue_delay_microseconds) if batching else None)


def with_settings(cfg, s: Settings):
    """A copy of the ModelConfig `cfg` with `s` applied (preferred sizes by the rendering rule)."""
    new = type(cfg)()
    new.CopyFrom(cfg)
    if not new.instance_group:
        new.instance_group.add()
    for group in new.instance_group:
        group.count = s.instances
    if s.queue_delay_us is not None:
        new.max_batch_size = s.max_batch_size
        del new.dynamic_batching.preferred_batch_size[:]
        new.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes(s.preferred, s.max_batch_size))
        new.dynamic_batching.max_queue_delay_microseconds = s.queue_delay_us
    return new


def config_text(cfg, where: str) -> str:
    """The message as config.pbtxt text, parsed back with Triton's schema before anyone writes it."""
    from google.protobuf import text_format

    text = text_format.MessageToString(cfg)
    parse_config(text, where)
    return text


def grids(default: Settings, *, cores: int, min_batch: int = 1) -> dict[str, list]:
    """Per axis, the values the search may visit (the default's own value always among them).
    max_batch_size never goes above the built one (the artifact and its ensemble were made for it)
    nor below `min_batch` (an ensemble over this model needs at least its own max_batch_size)."""
    out: dict[str, list] = {"instances": sorted({i for i in INSTANCE_STEPS if i <= max(2, 2 * cores)}
                                                | {default.instances})}
    if default.queue_delay_us is None:
        return out
    top = default.max_batch_size
    out["queue_delay_us"] = sorted(set(DELAY_STEPS_US) | {default.queue_delay_us})
    out["max_batch_size"] = sorted({b for b in BATCH_STEPS if min_batch <= b < top} | {top})
    out["preferred"] = [(), default.preferred] if default.preferred else [()]
    return out


def _moved(s: Settings, axis: str, value) -> Settings:
    return replace(s, **{axis: value}).normal()


def _lowest(axis: str) -> tuple[int, ...]:
    """Grid indexes the search visits besides the neighbours: max_batch_size 1, no batching at all, a regime of its
    own (parallel instances without a batch to wait for)."""
    return (0,) if axis == "max_batch_size" else ()


def search(default: Settings, grid: dict[str, list], budget: int,
           evaluate: Callable[[Settings], float | None]) -> list[tuple[Settings, float | None]]:
    """Run `evaluate` (a score, higher is better; None: no valid measurement) on at most `budget`
    distinct settings, default first; returns them in the order tried."""
    tried: dict[Settings, float | None] = {}

    def run(s: Settings) -> None:
        s = s.normal()
        if s not in tried and len(tried) < budget:
            tried[s] = evaluate(s)

    def best() -> Settings:
        scored = [(v, s) for s, v in tried.items() if v is not None]
        return max(scored, key=lambda p: p[0])[1] if scored else default.normal()

    run(default)
    axes = [a for a in AXES if a in grid and len(grid[a]) > 1]
    for axis in axes:  # coarse: far moves from the default along each axis (one step on a short axis)
        values = grid[axis]
        i, step = values.index(getattr(default, axis)), 2 if len(values) >= 5 else 1
        for j in dict.fromkeys((min(i + step, len(values) - 1), max(i - step, 0), *_lowest(axis))):
            if j != i:
                run(_moved(default, axis, values[j]))
    base = tried[default.normal()]
    # combine: every axis value that beat the default on its own, together
    winners = {}
    for axis in axes:
        moves = [(v, s) for s, v in tried.items() if v is not None and (base is None or v > base)
                 and all(getattr(s, a) == getattr(default.normal(), a) for a in axes if a != axis)
                 and getattr(s, axis) != getattr(default.normal(), axis)]
        if moves:
            winners[axis] = getattr(max(moves, key=lambda p: p[0])[1], axis)
    if len(winners) > 1:
        run(replace(default, **winners))
    # refine: one-step neighbours of the best, until the budget or nothing new; the batch size first, down to no
    # batching, because it interacts with the instance count (2 instances x max batch 1 beat 2 x 16 by 30 % for
    # MiniLM int8 on 2 cores, where neither move alone beat the default: docs/PERFORMANCE.md)
    order = sorted(axes, key=lambda a: a != "max_batch_size")
    while len(tried) < budget:
        centre, before = best(), len(tried)
        for axis in order:
            values = grid[axis]
            value = getattr(centre, axis)
            i = values.index(value) if value in values else 0
            for j in dict.fromkeys((*_lowest(axis), i + 1, i - 1)):
                if 0 <= j < len(values):
                    run(_moved(centre, axis, values[j]))
        if len(tried) == before:
            break
    return list(tried.items())
