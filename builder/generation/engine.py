"""Continuous batching over a Decoder: requests join the running batch at the next step and leave at once.

This file is copied unchanged next to the served model (`<model>/1/engine.py`): it needs torch and
`tokenizers` only. The Triton model (templates/python/generator.py) turns requests into `Request`s and
`Output`s into responses; the build runs the same engine in-process to verify it.

Each step: finished and cancelled sequences free their cache slot; waiting requests take free slots
(first come, first served; none is dropped); every decoding sequence feeds its last token, and prompts
are fed in chunks of at most `prefill_chunk` tokens per step in all, so a long prompt delays the others
by one chunk's time per step, not by its whole prefill.

What a streamed token costs the server, not the GPU, sets the pace at high concurrency: each response is a
round trip from the python backend's stub to Triton (~150-370 µs on a 2-core CPU, timed inside the real stub), and
so is asking whether a request was cancelled (~100 µs). So a streaming request gets its first token at once
and then one response per `stream_interval` tokens (0: automatic, about ROWS_PER_STEP responses per step in
all), and cancellation is polled every step only while requests wait for a slot, else every CANCEL_EVERY steps.

With `overlap` (the server turns it on with CUDA graphs), the host's work for a step runs while the device runs
the next one: step N+1 is launched with step N's tokens still on the device, then N's tokens are read and
its rows advanced (`_overlapped`, `_launch`); a row that N turns out to end is dropped from N+1's results.

Tokens are picked on the device for every row at once (`pick`): argmax, or temperature, top-k, top-p and a
draw at a uniform number hashed from (the request's seed, the position drawn), so sampled requests overlap too
and a seed gives the same tokens whatever else shares the steps.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

if __package__:
    from .blocks import BlockManager, blocks_for
else:  # served: beside this file in the model's directory
    from blocks import BlockManager, blocks_for

HOLDBACK_PROMPT_TOKENS = 5  # prompt tokens decoded with the output so the first piece gets its leading space
HOLD_TOKENS = 8  # a character is at most 4 UTF-8 bytes: output held back longer than this will not complete
ROWS_PER_STEP = 8  # stream_interval 0: streamed responses per step in all, about (1 per token up to 8 sequences)
CANCEL_EVERY = 16  # steps between cancellation polls while no request waits for a slot
MAX_QUEUE_TIMES = 100_000  # queue times kept for the metrics thread at most: an engine without one stays bounded


@dataclass
class Output:
    text: str  # streaming: the new piece; otherwise the whole generated text
    finished: bool = False
    finish_reason: str = ""  # "stop" (end token or stop string) | "length" | "" while running
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None  # the request failed while running: the server stays up, the request gets this
    token_ids: list[int] | None = None  # the generated ids, on the final output
    # the tokens since the previous output as (id, logprob, [(id, logprob) of the most likely]), when asked for
    tokens: list | None = None


@dataclass(eq=False)  # identity: two requests with the same fields are still two (running.remove, `in`)
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Output], None]  # called on the engine thread
    stream: bool = False
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    cancelled: Callable[[], bool] = lambda: False
    logprobs: int = -1  # -1: none; 0: each generated token's log-probability; k: and the k most likely tokens'
    guide: object = None  # guided decoding: .mask(row) limits a logits row in place, .accept(token) moves on
    # engine state
    slot: int = -1
    fed: int = 0  # prompt tokens already in the cache
    output: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already streamed
    streamed: int = 0  # output tokens when the last streamed response went out
    detok: "Detokenizer | None" = None
    draws: int = -1  # the seed of this request's draws (`seed`, or a random one when sampling starts)
    scored: list = field(default_factory=list)  # (id, logprob, top) of tokens not in an output yet (logprobs >= 0)
    table: list[int] = field(default_factory=list)  # its KV-cache blocks (paged cache)
    refill: int = 0  # output tokens to put back in the cache before decoding on (after a preemption)
    arrived: float = field(default_factory=time.monotonic)  # when it was made (submitted), for the queue time
    admitted: bool = False  # it has had a slot once (a preempted request's second wait is not queue time)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt) + self.refill

    def context(self) -> list[int]:
        """The tokens a prefill puts in the cache: the prompt, and the output so far when it was preempted."""
        return self.prompt + self.output[:self.refill] if self.refill else self.prompt


@dataclass
class Ahead:
    """A decode step launched but not read yet (Engine.overlap)."""

    reqs: list[Request]  # the requests it samples a token for, in order
    tokens: torch.Tensor  # the picked tokens, on the device (the next step's input)
    host: torch.Tensor  # the same, copied to the host once `ready` has passed
    ready: object  # a CUDA event recorded after that copy; None on the CPU
    positions: list[int]  # the position each request's sampled row fed
    rows: int = 0  # rows in the step, prompt rows included
    scores: list | None = None  # per request: (logprob, top) when it asked for logprobs (`scored`)


class Detokenizer:
    """Incremental decoding that never splits a multi-byte character: a piece is released only when the
    decoded text grew and does not end in U+FFFD (an incomplete UTF-8 sequence), or when more than HOLD_TOKENS
    tokens wait (bytes that will never form a character: without the bound, every decode grows with them)."""

    def __init__(self, tokenizer, prompt: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt[-HOLDBACK_PROMPT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def push(self, token: int) -> None:
        """Take a token without decoding it yet (no response is due): the next `add` or `flush` catches up."""
        self.ids.append(token)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")
                                         or len(self.ids) - self.read > HOLD_TOKENS):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


def rows_of(seqs: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """The cache slot and the position of every row of (slot, start position, count) sequences."""
    return ([slot for slot, _, n in seqs for _ in range(n)],
            [p for _, start, n in seqs for p in range(start, start + n)])


def on_device(device: torch.device, dtype: torch.dtype, *lists: list) -> list[torch.Tensor]:
    """Lists of numbers as tensors on `device`: one host tensor (pinned on a GPU) and one copy that does not wait
    for the device. A plain torch.tensor(..., device="cuda") waits for every step queued before it, which undid
    most of the overlap of steps."""
    host = torch.tensor([v for x in lists for v in x], dtype=dtype, pin_memory=device.type == "cuda")
    return list(host.to(device, non_blocking=True).split([len(x) for x in lists]))


M64 = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: a 64-bit integer hash whose output bits each depend on every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def uniform(seed: int, counter: int) -> float:
    """A uniform number in (0, 1) with 53 bits, a hash of (seed, counter) only, so a request draws the same tokens
    whatever else shares its steps. Computed on the host (~1 µs) and sent with the step's other per-row values:
    on the device a hash took ~15 kernel launches a step."""
    x = _mix64(_mix64((counter + GOLDEN) & M64) ^ (seed & M64))
    return ((x >> 11) + 0.5) / 2**53


def pick(logits: torch.Tensor, reqs: list[Request], positions: list[int]) -> torch.Tensor:
    """The next token of every row, on the logits' device, without a sync: argmax for greedy requests; for the
    others temperature, top-k, top-p (over the top-k renormalized, keeping the token that crosses top_p) and a
    draw that inverts the kept probabilities' running sum at a uniform number hashed from (the request's seed,
    the position drawn). All rows in one batch; `positions`: the position each row fed (the token drawn goes
    after it). Few operators, as each is a kernel launch on a GPU, where this runs every step: the kept tokens
    are a prefix of the sorted row, so one float64 running sum serves the cuts and the draw alike."""
    hot = [i for i, r in enumerate(reqs) if r.temperature > 0]
    if not hot:
        return logits.argmax(-1)
    for i in hot:
        if reqs[i].draws < 0:
            # hashed on the host (`uniform`): every UINT64 seed counts, none is cut to fit a tensor
            reqs[i].draws = reqs[i].seed if reqs[i].seed is not None else random.getrandbits(64)
    dev, vocab = logits.device, logits.shape[-1]
    hr = [reqs[i] for i in hot]
    cut_k, cut_p = any(0 < r.top_k < vocab for r in hr), any(r.top_p < 1.0 for r in hr)
    every = len(hot) == len(reqs)
    params = [[r.temperature for r in hr], [uniform(r.draws, positions[i] + 1) for i, r in zip(hot, hr)],
              [r.top_p for r in hr] if cut_p else [], [r.top_k if 0 < r.top_k < vocab else vocab for r in hr] if cut_k
              else [], [] if every else hot]
    temperature, u, top_p, top_k, rows = on_device(dev, torch.float64, *params)  # one copy, no sync
    rows = None if every else rows.long()
    x = (logits if every else logits[rows]) / temperature.float()[:, None]
    order = None
    if cut_k or cut_p:  # the cuts go by rank: sort once
        x, order = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(x, dim=-1)
    total = probs.cumsum(-1, dtype=torch.float64)  # float64: 128k terms summed without drift
    if order is None:
        kept = total[:, -1:]
    else:  # how many tokens each row keeps: its top-k, then the top-p of those renormalized
        count = top_k.long()[:, None] if cut_k else None
        if cut_p:
            limit = top_p[:, None] * (total.gather(-1, count - 1) if cut_k else 1.0)
            within = ((total - probs) <= limit).sum(-1, keepdim=True)  # a prefix: the first always counts
            count = within if count is None else torch.minimum(within, count)
        kept = total.gather(-1, count - 1)
    # the first token whose running sum passes u * (the kept mass): a kept token with a nonzero probability
    at = torch.searchsorted(total, u[:, None] * kept, right=True).clamp_(max=vocab - 1)
    drawn = (at if order is None else order.gather(-1, at))[:, 0]
    return drawn if every else logits.argmax(-1).index_copy(0, rows, drawn)


def guided(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
    """The rows of guided requests limited to what their grammar allows next (on a copy: the decoder's buffers
    stay as they are); the same tensor when no request is guided."""
    rows = [i for i, r in enumerate(reqs) if r.guide is not None]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        reqs[i].guide.mask(logits[i])
    return logits


def scored(logits: torch.Tensor, reqs: list[Request], picked: torch.Tensor) -> list | None:
    """Per request, (the picked token's log-probability, [(id, log-probability)] of its `logprobs` most likely
    tokens) where it asked for logprobs, else None; None for all when none asked (no work, no sync)."""
    want = [i for i, r in enumerate(reqs) if r.logprobs >= 0]
    if not want:
        return None
    at = torch.tensor(want, device=logits.device)
    lp = torch.log_softmax(logits[at].float(), dim=-1)
    chosen = lp.gather(-1, picked[at][:, None])[:, 0].tolist()
    k = max(reqs[i].logprobs for i in want)
    top = lp.topk(k, dim=-1) if k else None
    ids, values = (top.indices.tolist(), top.values.tolist()) if k else ([], [])
    out: list = [None] * len(reqs)
    for j, i in enumerate(want):
        n = reqs[i].logprobs
        out[i] = (chosen[j], list(zip(ids[j][:n], values[j][:n])) if n else [])
    return out


class Engine:
    def __init__(self, decoder, tokenizer, *, max_sequences: int, max_total_tokens: int, prefill_chunk: int,
                 stream_interval: int = 0, kv_cache: str = "paged", block_size: int = 16, cache_blocks: int = 0,
                 prefix_caching: bool = True):
        """kv_cache: "paged" (blocks of `block_size` tokens in one pool of `cache_blocks`; 0: as many as
        `max_sequences` full-length sequences take; see blocks.py) or "slots" (`max_total_tokens` reserved per
        sequence). max_sequences: at most this many sequences run at once (a table row, or a slot, each)."""
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.max_total = max_total_tokens
        self.prefill_chunk = prefill_chunk
        self.stream_interval = stream_interval  # tokens per streamed response after the first; 0: automatic
        self.interval = 1  # this step's
        self.eos = set(decoder.config.eos_token_ids)
        self.decoder_slots = max_sequences
        self.blocks: BlockManager | None = None
        if kv_cache == "paged":
            per_sequence = blocks_for(max_total_tokens, block_size)
            cache_blocks = cache_blocks or max_sequences * per_sequence
            if cache_blocks < per_sequence:
                raise ValueError(f"a KV cache of {cache_blocks} blocks of {block_size} tokens cannot hold one sequence "
                                 f"of max_total_tokens {max_total_tokens}; give it more memory or lower max_total_tokens")
            decoder.allocate_paged(max_sequences, max_total_tokens, cache_blocks, block_size)
            self.blocks = BlockManager(cache_blocks, block_size, prefix_caching)
        else:
            decoder.allocate(max_sequences, max_total_tokens)
        self.dirty: dict[int, list[int]] = {}  # slot -> block table, to copy to the decoder before the next step
        self.preempted = 0  # sequences sent back to wait (their blocks taken) since the start
        # seconds each request waited from arrival to its first admission, until the metrics thread takes them
        self.queue_times: list[float] = []
        self.queue_lock = threading.Lock()
        self.decode_step = decoder.decode  # the server may swap in decoder.Graphs(decoder) on a GPU
        # decode steps overlap the host's work (on with CUDA graphs): step N+1 is launched with step N's tokens
        # still on the device, then N's tokens are read and its rows advanced while the device runs N+1 (`ahead`
        # is the launched step not read yet)
        self.overlap = False
        self.ahead: Ahead | None = None
        # prompt steps through decode_step too, a row per prompt token (on with CUDA graphs: one replay instead
        # of the eager ragged forward; on the CPU the ragged forward is cheaper, its attention reads the cache once)
        self.graphed_prompts = False
        self.free = list(range(max_sequences))[::-1]
        self.running: list[Request] = []
        self.waiting: list[Request] = []
        self.inbox: queue.Queue = queue.Queue()
        self.steps = 0
        # where a served step's time goes (seconds summed over steps; summary() prints it): `plan` the host
        # work before the model (admission, packing), `model` the input tensors and the call (a graph replay
        # only launches), `wait` until the sampled tokens are on the host (the device's work lands here),
        # `advance` the rows' bookkeeping, detokenizing and handing responses to the sender; `between` from the
        # end of a step that left sequences running to the start of the next (the loop, and waiting for the GIL)
        self.clock = dict.fromkeys(("plan", "model", "wait", "advance", "between"), 0.0)
        self.clocked = self.clocked_rows = 0
        self.ended: float | None = None  # when the last step ended, if it left sequences running

    def warm(self) -> None:
        """Pick once from dummy logits of every path of `pick` (greedy, temperature only, top-k/top-p) at the
        most rows a step picks, so the first sampled request does not pay for loading their kernels (the first
        sampled step at 32 streams took ~260 ms on the H100)."""
        rows, vocab = len(self.free), self.decoder.config.vocab_size
        logits = torch.zeros(rows, vocab, device=self.decoder.device)
        for options in ({}, {"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9, "top_k": 50}):
            reqs = [Request([0], 1, emit=lambda o: None, seed=0, **options) for _ in range(rows)]
            pick(logits, reqs, [0] * rows).tolist()

    # -- the API the server uses (any thread) --
    def submit(self, req: Request) -> None:
        self.inbox.put(req)

    def run(self, stop: threading.Event) -> None:
        """Step until `stop` is set; sleeps on the inbox while idle. A step that fails outside the model call
        (a bug, say) fails the requests in flight with its error rather than leaving their clients waiting."""
        while not stop.is_set():
            if not self.running and not self.waiting:
                try:
                    self.waiting.append(self.inbox.get(timeout=0.1))
                except queue.Empty:
                    continue
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - every request gets an answer; the engine goes on
                self.ahead = None
                self._fail(self.running + self.waiting, exc)
                self.waiting.clear()

    # -- one scheduler step (engine thread) --
    def summary(self) -> str:
        """One line: steps timed, rows per step and mean milliseconds per phase."""
        n = max(self.clocked, 1)
        cache = ""
        if self.blocks is not None:
            cache = (f"; prefix cache hit rate {self.blocks.hit_rate:.3f} ({self.blocks.hits} of {self.blocks.queried} "
                     f"prompt tokens), {self.preempted} preempted")
        return (f"{self.clocked} steps, {self.clocked_rows / n:.1f} rows per step; ms per step: "
                + ", ".join(f"{k} {v / n * 1e3:.3f}" for k, v in self.clock.items()) + cache)

    def step(self) -> None:
        t0 = time.perf_counter()
        if self.ended is not None:
            self.clock["between"] += t0 - self.ended
            self.ended = None
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        if self.waiting or self.steps % CANCEL_EVERY == 0:  # a cancelled request's slot is wanted now, or a poll
            self._drop_cancelled()
        if not (self.blocks is not None and self._make_room()):  # none is admitted in a step that preempted
            self._admit()
        if self.dirty:
            self.decoder.set_tables(list(self.dirty), list(self.dirty.values()))
            self.dirty.clear()
        if not self.running and self.ahead is None:
            return
        self.interval = self.stream_interval or max(1, -(-len(self.running) // ROWS_PER_STEP))
        if self.overlap or self.ahead is not None:
            if self._overlapped(t0):
                return
            t0 = time.perf_counter()  # a normal step follows; what the overlapped part took is clocked already
        if not self.running:
            return
        decoding = [r for r in self.running if not r.prefilling]
        prompting = [r for r in self.running if r.prefilling]
        tokens, seqs, last, sampled = self._plan(decoding, prompting)
        t1 = time.perf_counter()
        try:
            if not prompting or self.graphed_prompts:  # the tensor-only step, a row per token (CUDA graphs where set)
                slots, positions = rows_of(seqs)
                mixed = len(tokens) > len(seqs)  # prompt rows after the decoding ones: logits of each sequence's last
                logits = self._step(tokens, slots, positions, len(decoding) if mixed else None, last if mixed else None)
            else:  # the ragged forward: decoding rows together, then each prompt chunk over its own prefix
                logits = self.decoder(on_device(self.decoder.device, torch.long, tokens)[0], seqs, last)
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the engine keeps serving
            self._fail(self.running, exc)
            return
        t2 = time.perf_counter()
        self.steps += 1
        rows = self._feed(sampled, seqs)
        fed = [start + n - 1 for _, start, n in seqs]
        picking = [sampled[i] for i in rows]
        logits = guided(logits[rows] if len(rows) < len(seqs) else logits, picking)
        picked_t = pick(logits, picking, [fed[i] for i in rows])
        scores = scored(logits, picking, picked_t)
        picked = picked_t.tolist()  # one sync for every row
        t3 = time.perf_counter()
        for j, (i, token) in enumerate(zip(rows, picked)):
            self._advance(sampled[i], token, scores[j] if scores else None)
        self._tally((t0, t1, t2, t3, time.perf_counter()), len(tokens))

    def _admit(self) -> None:
        """Waiting requests take a free slot, first come first served, none dropped; with a paged cache also the
        blocks of their prompt (cached blocks of its prefix shared, its prefill starting after them): one that
        the pool cannot hold yet waits, and so do those behind it."""
        while self.free and self.waiting:
            req = self.waiting[0]
            if self.blocks is not None:
                context = req.context()
                got = self.blocks.admit(context, min(len(context) + 1, self.max_total))
                if got is None:
                    break
                req.table, req.fed = got  # the prefill starts after the cached prefix
            self.waiting.pop(0)
            req.slot = self.free.pop()
            if req.detok is None:  # a preempted request keeps its own
                req.detok = Detokenizer(self.tokenizer, req.prompt)
            self.running.append(req)
            if self.blocks is not None:
                self.dirty[req.slot] = req.table
            if not req.admitted:
                req.admitted = True
                with self.queue_lock:
                    if len(self.queue_times) < MAX_QUEUE_TIMES:  # nobody takes them: not a leak
                        self.queue_times.append(time.monotonic() - req.arrived)

    def _make_room(self) -> bool:
        """Paged: every running sequence's table grows to what the next step may write (its next row, and the
        row of a step in flight). When the pool runs out, the newest sequence gives its blocks back and waits
        at the head of the queue, to be recomputed (prompt and output so far) when blocks free up; its greedy
        text is the same. Returns whether one was preempted."""
        preempted = False
        for req in list(self.running):
            if req not in self.running:
                continue
            had = len(req.table)
            need = min(len(req.prompt) + len(req.output) + 1, self.max_total)
            while not self.blocks.grow(req.table, need):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req in self.running and len(req.table) != had:
                self.dirty[req.slot] = req.table
        return preempted

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.free.append(req.slot)
        self.dirty.pop(req.slot, None)
        self.blocks.release(req.table)
        req.fed, req.refill = 0, len(req.output)
        self.waiting.insert(0, req)
        self.preempted += 1

    def _overlapped(self, t0: float) -> bool:
        """The overlapped step (see `overlap`): launch the next step, its decoding rows fed from the step ahead's
        tokens on the device, then read the step ahead and advance its rows. False when a plain step must run
        now (prompts without graphed prompts); the step ahead has then been read."""
        ahead = self.ahead
        can = self.overlap and (self.graphed_prompts or not any(r.prefilling for r in self.running)) \
            and not any(r.guide is not None for r in self.running)  # a grammar's next mask needs the token read
        if ahead is None and not can:
            return False
        running = set(map(id, self.running))  # cancelled requests have left already
        t1 = time.perf_counter()
        try:
            nxt = self._launch(ahead, running) if can else None
            t2 = time.perf_counter()
            picked = []
            if ahead is not None:
                if ahead.ready is not None:
                    ahead.ready.synchronize()  # step N only; N+1 runs on
                picked = ahead.host.tolist()
        except Exception as exc:  # noqa: BLE001 - as in a plain step: the requests get the error, serving goes on
            self.ahead = None
            self._fail(self.running, exc)
            return True
        t3 = time.perf_counter()
        for k, (req, token) in enumerate(zip(ahead.reqs if ahead else [], picked)):
            if id(req) in running:  # finished earlier rows have no next row; a request appears once
                self._advance(req, token, ahead.scores[k] if ahead.scores else None)
        self.ahead = nxt
        self._tally((t0, t1, t2, t3, time.perf_counter()), nxt.rows if nxt else 0)
        return nxt is not None

    def _tally(self, marks: tuple[float, ...], rows: int) -> None:
        """Add a step's phases (plan, model, wait, advance: the gaps between `marks`) to the clock; a step that
        ran `rows` rows counts as one, and the time to the next step is `between` while sequences run."""
        for key, start, end in zip(self.clock, marks, marks[1:]):
            self.clock[key] += end - start
        if rows:
            self.clocked += 1
            self.clocked_rows += rows
            self.ended = marks[-1] if self.running else None

    def _fail(self, reqs: list[Request], exc: Exception) -> None:
        """Answer `reqs` (running or waiting) with the error; their slots come back."""
        for req in list(reqs):
            self._finish(req, "", error=f"generation failed: {type(exc).__name__}: {exc}", flush=False)

    def _feed(self, sampled: list[Request], seqs: list[tuple[int, int, int]]) -> list[int]:
        """After a step of `_plan`'s sequences: the prompt tokens fed count as fed; returns the indexes of the
        sequences that sample a token (decoding ones, and those whose prompt ended in this step)."""
        rows = [i for i, (req, (_, _, n)) in enumerate(zip(sampled, seqs))
                if req.fed + n >= len(req.prompt) + req.refill]
        for req, (_, _, n) in zip(sampled, seqs):
            if req.prefilling:
                req.fed += n
                if self.blocks is not None:  # its blocks that became full: found by later prompts from now on
                    self.blocks.publish(req.table, req.context(), req.fed - n, req.fed)
        return rows

    def _launch(self, ahead: "Ahead | None", running: set[int]) -> "Ahead | None":
        """Launch a step: first the rows of the step ahead that go on (their tokens are on the device),
        then decoding rows whose last token is on the host, then prompt chunks within `prefill_chunk` (a
        request whose prompt ends here samples its first token). Its tokens stay on the device; a copy to the
        host is queued behind it. None when there is no row to run."""
        reqs, positions = [], []
        keep: list[int] = []
        if ahead is not None:  # not the rows whose token in flight is their last: they end at `length` on reading
            keep = [i for i, r in enumerate(ahead.reqs) if id(r) in running and len(r.output) + 1 < r.max_tokens
                    and len(r.prompt) + len(r.output) + 1 < self.max_total]
            reqs, positions = [ahead.reqs[i] for i in keep], [ahead.positions[i] + 1 for i in keep]
        flying = set(map(id, ahead.reqs)) if ahead is not None else set()
        # after the device-fed rows: decoding rows whose last token is on the host, then prompt chunks
        tokens, seqs, last, sampled = self._plan(
            [r for r in self.running if not r.prefilling and id(r) not in flying],
            [r for r in self.running if r.prefilling])
        host_slots, host_fed = rows_of(seqs)
        offset = len(reqs)
        slots, fed, rows = [r.slot for r in reqs] + host_slots, positions + host_fed, list(range(offset))
        decoding = offset + sum(1 for r in sampled if not r.prefilling)  # before _feed: the rows that were decoding
        for i in self._feed(sampled, seqs):  # decoding rows, and prompts that end here (their first token)
            _, start, n = seqs[i]
            rows.append(offset + last[i])
            reqs.append(sampled[i])
            positions.append(start + n - 1)
        if not slots:
            return None
        mixed = len(rows) != len(slots)  # prompt rows: logits of the picked rows only
        logits = self._step(tokens, slots, fed, decoding if mixed else None, rows if mixed else None,
                            ahead.tokens if keep else None, keep if keep and len(keep) < len(ahead.reqs) else None)
        logits = guided(logits, reqs)
        picked = pick(logits, reqs, positions)  # sampled rows too: pick does not sync
        scores = scored(logits, reqs, picked)  # syncs, only where a request asked for logprobs
        self.steps += 1
        if picked.is_cuda:
            copy = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
            copy.copy_(picked, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(picked.device))  # this thread's current device may differ
            return Ahead(reqs, picked, copy, ready, positions, len(slots), scores)
        return Ahead(reqs, picked, picked, None, positions, len(slots), scores)

    def _step(self, tokens: list[int], slots: list[int], positions: list[int], decoding: int | None = None,
              picks: list[int] | None = None, ahead_tokens: torch.Tensor | None = None,
              keep: list[int] | None = None) -> torch.Tensor:
        """decode_step over rows given as lists (see Decoder.decode; `decoding`/`picks` for a step with prompt
        rows). ahead_tokens: the step ahead's tokens on the device, which feed the first rows (those at `keep`
        only, if given); `tokens` feed the rest (all through `on_device`: no wait for the device)."""
        lists = [tokens, slots, positions, [decoding] if decoding is not None else [], picks or [], keep or []]
        tokens_t, slots_t, positions_t, decoding_t, picks_t, keep_t = on_device(self.decoder.device, torch.long, *lists)
        if ahead_tokens is not None:
            tokens_t = torch.cat((ahead_tokens if keep is None else ahead_tokens[keep_t], tokens_t))
        if decoding is None:
            return self.decode_step(tokens_t, slots_t, positions_t, max(positions) + 1)
        return self.decode_step(tokens_t, slots_t, positions_t, max(positions) + 1, decoding_t, picks_t)

    def _plan(self, decoding: list[Request], prompting: list[Request]):
        """One step's inputs: decoding sequences first (one token each), then prompt chunks within the step's
        budget. Returns the packed tokens, (slot, start position, count) per sequence, the packed index of each
        sequence's last token, and the sequences. Only the first chunk may continue a prompt (Decoder.decode's
        mixed steps rely on it; FIFO admission makes it so, the check keeps it so)."""
        tokens, seqs, last, sampled = [], [], [], []
        budget = self.prefill_chunk
        chunks = 0
        for req in decoding + prompting:
            if req.prefilling:
                if budget <= 0 or (chunks and req.fed):
                    break
                chunks += 1
                context = req.context()
                n = min(budget, len(context) - req.fed)
                budget -= n
                tokens.extend(context[req.fed:req.fed + n])
                seqs.append((req.slot, req.fed, n))
            else:
                tokens.append(req.output[-1])
                seqs.append((req.slot, len(req.prompt) + len(req.output) - 1, 1))
            last.append(len(tokens) - 1)
            sampled.append(req)
        return tokens, seqs, last, sampled

    def _advance(self, req: Request, token: int, score: tuple | None = None) -> None:
        if token in self.eos and not req.ignore_eos:
            self._finish(req, "stop")
            return
        req.output.append(token)
        if req.guide is not None:
            req.guide.accept(token)
        if score is not None:
            req.scored.append((token, *score))
        due = req.stream and (req.sent == 0 or len(req.output) - req.streamed >= self.interval)
        if not (due or req.stop):  # text is needed only to send it or to look for a stop string: decode later
            req.detok.push(token)
            piece = ""
        else:
            piece = req.detok.add(token)
            req.text += piece
        if req.stop and self._cut_at_stop(req, len(piece)):
            self._finish(req, "stop", flush=False)
        elif len(req.output) >= req.max_tokens or len(req.prompt) + len(req.output) >= self.max_total:
            self._finish(req, "length")
        elif due:
            hold = max((len(s) for s in req.stop), default=1) - 1  # text that may still become a stop string
            upto = len(req.text) - hold
            if upto > req.sent:
                self._emit(req, Output(req.text[req.sent:upto], num_input_tokens=len(req.prompt),
                                       num_output_tokens=len(req.output), tokens=self._scored(req)))
                req.sent, req.streamed = upto, len(req.output)

    @staticmethod
    def _cut_at_stop(req: Request, new_chars: int) -> bool:
        """Cut the text at the first stop string that the last `new_chars` characters completed."""
        longest = max(len(s) for s in req.stop)
        start = max(0, len(req.text) - new_chars - longest + 1)
        found = [at for at in (req.text.find(s, start) for s in req.stop) if at >= 0]
        if found:
            req.text = req.text[:min(found)]
        return bool(found)

    def _finish(self, req: Request, reason: str, error: str | None = None, flush: bool = True) -> None:
        if flush and req.detok is not None:
            tail = req.detok.flush()
            req.text += tail
            if req.stop and tail and self._cut_at_stop(req, len(tail)):
                reason = "stop"
        piece = req.text[req.sent:] if req.stream else req.text
        req.sent = len(req.text)
        self._release(req)
        self._emit(req, Output(piece, True, reason, len(req.prompt), len(req.output), error, list(req.output),
                               self._scored(req)))

    @staticmethod
    def _scored(req: Request) -> list | None:
        """The scored tokens not sent yet, for an output (None when the request did not ask for logprobs)."""
        if req.logprobs < 0:
            return None
        out, req.scored = req.scored, []
        return out

    def _emit(self, req: Request, out: Output) -> None:
        try:
            req.emit(out)
        except Exception:  # noqa: BLE001 - a client that went away: stop generating for it
            self._release(req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            self.free.append(req.slot)
            if self.blocks is not None:
                self.dirty.pop(req.slot, None)
                self.blocks.release(req.table)

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.running + self.waiting if r.cancelled()]:
            if req in self.waiting:
                self.waiting.remove(req)
            self._release(req)
            # the final response: Triton releases a request only after one (with the FINAL flag) is sent
            self._emit(req, Output("", True, "cancelled", len(req.prompt), len(req.output), "cancelled"))

    def take_queue_times(self) -> list[float]:
        """The queue times recorded since the last call (any thread)."""
        with self.queue_lock:
            out, self.queue_times = self.queue_times, []
        return out

    def load(self) -> tuple[int, int, float]:
        """(running sequences, waiting requests, the share of the KV cache's tokens in use) for metrics; read
        from any thread (a snapshot, not exact while a step runs)."""
        running = list(self.running)
        if self.blocks is not None:  # the pool's blocks: shared by a prefix count once; cached unused ones are free
            share = self.blocks.used / self.blocks.num_blocks
        else:  # the slot layout's tokens
            share = sum(len(r.prompt) + len(r.output) for r in running) / (self.decoder_slots * self.max_total)
        return len(running), len(self.waiting) + self.inbox.qsize(), share


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int, **options) -> list[Output]:
    """Run prompts to completion in-process, all submitted at once, as the server would; for checks."""
    finals: dict[int, Output] = {}

    def keeper(i: int) -> Callable[[Output], None]:
        return lambda out: finals.__setitem__(i, out) if out.finished else None

    for i, prompt in enumerate(prompts):
        engine.submit(Request(prompt, max_tokens, emit=keeper(i), **options))
    while len(finals) < len(prompts):
        engine.step()
    return [finals[i] for i in range(len(prompts))]
