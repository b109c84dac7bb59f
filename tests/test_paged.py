"""The paged KV cache: block accounting, prefix caching, preemption, and greedy text equal to the slot cache."""

from __future__ import annotations

import pytest
import torch

from builder.generation import engine as eng
from builder.generation import hf2decoder
from builder.generation.blocks import BlockManager
from builder.generation.decoder import Decoder
from tiny_llm import make_model_dir

PROMPTS = ["Triton serves models", "The quick brown fox jumps over the lazy dog.", "Ünïcödé 🚀", "Continuous"]
PREFIX = "The quick brown fox jumps over the lazy dog. " * 4  # ~50 tokens: several 8-token blocks


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import transformers

    path = make_model_dir(tmp_path_factory.mktemp("llama"), "llama")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    return tok, config, weights


def _engine(llama, slots=3, total=96, chunk=5, **options):
    tok, config, weights = llama
    return eng.Engine(Decoder(config, weights), tok, max_sequences=slots, max_total_tokens=total, prefill_chunk=chunk,
                      **options)


def _ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def _submit(engine, prompts, max_tokens) -> dict:
    """Submit every prompt (greedy, no early stop); the dict fills with each one's final output by index."""
    finals = {}
    for i, p in enumerate(prompts):
        engine.submit(eng.Request(p, max_tokens, emit=lambda o, i=i: finals.__setitem__(i, o) if o.finished else None,
                                  ignore_eos=True))
    return finals


def _check_pool(engine):
    """The pool's books: every block is free, cached and idle, or used by exactly `ref` running tables."""
    b = engine.blocks
    uses = [0] * b.num_blocks
    for req in engine.running:
        for block in req.table:
            uses[block] += 1
    assert uses == b.ref
    assert len(b.free) + len(b.idle) + sum(1 for r in b.ref if r) == b.num_blocks
    assert not set(b.free) & set(b.idle) and all(b.ref[x] == 0 for x in list(b.free) + list(b.idle))
    assert all(b.key[x] is not None for x in b.idle) and all(b.cached[b.key[x]] == x for x in b.idle)


# -- the block manager alone --

def test_blocks_are_shared_by_prefix_and_given_back_least_recently_released_first():
    m = BlockManager(6, 4)
    a = list(range(10))  # 2 full blocks and 2 tokens
    table, cached = m.admit(a, 11)
    assert (len(table), cached, m.available) == (3, 0, 3)
    m.publish(table, a, 0, 10)  # blocks 0 and 1 are full: keyed
    assert [m.key[x] is not None for x in table] == [True, True, False]
    other, cached = m.admit(a[:8] + [99, 98, 97], 12)  # same first 8 tokens: two blocks shared
    assert other[:2] == table[:2] and cached == 8 and m.ref[table[0]] == 2 and m.hit_rate == 8 / 21
    assert m.admit(a, 9 * 4) is None and m.available == 2  # refused whole: nothing taken
    shared = table[:2]
    m.release(other)
    m.release(table)
    assert m.ref == [0] * 6 and len(m.idle) == 2 and m.available == 6 and not table
    again, cached = m.admit(a, 11)  # the prefix is still there
    assert cached == 8 and again[:2] == shared
    m.release(again)
    fresh, cached = m.admit(list(range(50, 74)), 24)  # every block: the cached ones are evicted, keys forgotten
    assert cached == 0 and sorted(fresh) == list(range(6)) and not m.cached and not m.idle


def test_a_whole_cached_prompt_still_leaves_one_token_to_compute():
    m = BlockManager(8, 4)
    a = list(range(8))
    table, _ = m.admit(a, 9)
    m.publish(table, a, 0, 8)
    again, cached = m.admit(a, 9)  # its first token's logits need a step: the last block is computed again
    assert cached == 4 and again[0] == table[0] and again[1] not in table


def test_without_prefix_caching_nothing_is_shared():
    m = BlockManager(8, 4, prefix_caching=False)
    a = list(range(9))
    table, _ = m.admit(a, 10)
    m.publish(table, a, 0, 9)
    again, cached = m.admit(a, 10)
    assert cached == 0 and not set(again) & set(table)
    m.release(table)
    assert len(m.free) == 5 and not m.idle


# -- the decoder over block tables --

@pytest.fixture(params=["gather", "kernel"])
def attention(request):
    """How decoding rows read the paged cache: the gather, or paged_kernel.py's Triton kernel (in Triton's
    interpreter here, set by conftest.py; the GPU test below runs it compiled)."""
    if request.param == "kernel":
        pytest.importorskip("triton")
    return request.param


def _paged(config, weights, attention, *args) -> Decoder:
    dec = Decoder(config, weights)
    dec.allocate_paged(*args)
    if attention == "kernel":
        dec.use_paged_kernel()
    return dec


@pytest.mark.parametrize("heads,kv_heads,dim,block", [(8, 2, 64, 16), (9, 3, 64, 16), (4, 4, 80, 8), (32, 8, 128, 16),
                                                      (16, 2, 128, 32), (4, 2, 8, 8)])
def test_the_paged_kernel_equals_attention_over_each_rows_own_positions(heads, kv_heads, dim, block):
    """paged_kernel.attend (Triton's interpreter here) against softmax attention written out, for head layouts of
    Llama (groups of 4), SmolLM2 (3), multi-head (1), head_dims that are not a power of two or below tl.dot's 16 (the
    tests' tiny models), blocks of 8-32 tokens:
    rows of different lengths over shuffled blocks, a row of length 0 (zeros), and the keys read in one chunk and
    in several (the chunks follow the rows x kv heads, see `_programs`)."""
    pytest.importorskip("triton")
    from builder.generation import paged_kernel

    g = torch.Generator().manual_seed(heads + dim + block)
    rows, longest, pool = 3, 300, 80
    width = -(-longest // block)
    k_pool, v_pool = (torch.randn(pool * width // 4 + 1, block, kv_heads, dim, generator=g) for _ in range(2))
    tables = torch.randperm(k_pool.shape[0] - 1, generator=g)[:(rows + 1) * width].view(rows + 1, width)
    slots, lengths = torch.tensor([2, 0, 3]), torch.tensor([longest, 0, 37])
    q = torch.randn(rows, heads, dim, generator=g)
    want = torch.zeros(rows, heads, dim)
    for r in (0, 2):
        positions = torch.arange(int(lengths[r]))
        at = tables[slots[r], positions // block] * block + positions % block
        keys, values = (c.view(-1, kv_heads, dim)[at].repeat_interleave(heads // kv_heads, 1) for c in (k_pool, v_pool))
        weights = (torch.einsum("hd,lhd->hl", q[r], keys) * dim ** -0.5).softmax(-1)
        want[r] = torch.einsum("hl,lhd->hd", weights, values)
    for length in (longest, 2 * longest):  # a longer bound: more chunks, the same answer
        got = paged_kernel.attend(q, k_pool, v_pool, tables, slots, lengths, length)
        torch.testing.assert_close(got, want.view(rows, -1), rtol=1e-5, atol=1e-5)


def test_a_paged_mixed_step_gives_the_slot_caches_logits(llama, attention):
    """decode() with decoding rows, a continued prompt chunk and a new prompt, padded as a graph bucket pads them:
    the same logits over scattered blocks as over slots."""
    _, config, weights = llama
    slotted = Decoder(config, weights)
    slotted.allocate(4, 64)
    paged = _paged(config, weights, attention, 4, 64, 40, 8)
    perm = torch.randperm(40).tolist()  # every sequence's blocks scattered over the pool
    paged.set_tables([0, 1, 2, 3], [perm[i * 8:(i + 1) * 8] for i in range(4)])
    for slot, n in [(0, 7), (1, 12), (2, 6)]:
        ids = torch.randint(3, 200, (n,))
        torch.testing.assert_close(paged(ids, [(slot, 0, n)]), slotted(ids, [(slot, 0, n)]), rtol=1e-5, atol=1e-5)
    seqs = [(0, 7, 1), (1, 12, 1), (2, 6, 5), (3, 0, 4)]
    tokens = torch.randint(3, 200, (11,))
    slots, positions = eng.rows_of(seqs)
    pad = lambda t, value: torch.nn.functional.pad(torch.tensor(t), (0, 3), value=value)  # noqa: E731
    args = (pad(tokens.tolist(), 0), pad(slots, 4), pad(positions, 0), 16, torch.tensor([2]), torch.tensor([0, 1, 6, 10]))
    torch.testing.assert_close(paged.decode(*args), slotted.decode(*args), rtol=1e-5, atol=1e-5)
    decoding = (torch.tensor([3, 5, 9]), torch.tensor([0, 1, 2]), torch.tensor([8, 13, 12]), 32)
    torch.testing.assert_close(paged.decode(*decoding), slotted.decode(*decoding), rtol=1e-5, atol=1e-5)


# -- the engine --

@pytest.mark.parametrize("graphed", [False, True], ids=["ragged", "tensor-only"])
def test_paged_and_slot_caches_give_the_same_greedy_tokens(llama, graphed, attention):
    tok = llama[0]
    prompts = _ids(tok, PROMPTS + [PREFIX])
    outs = []
    for kv in ("slots", "paged"):
        e = _engine(llama, kv_cache=kv, block_size=8)
        if kv == "paged" and attention == "kernel":
            e.decoder.use_paged_kernel()
        e.graphed_prompts = graphed
        outs.append([o.token_ids for o in eng.generate(e, prompts, 20, ignore_eos=True)])
    assert outs[0] == outs[1] and all(len(o) == 20 for o in outs[1])
    assert not e.running and e.blocks.used == 0  # every block back (some kept cached, none in use)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_a_prefix_hit_gives_the_tokens_of_a_miss(llama, overlap):
    tok = llama[0]
    shared = _ids(tok, [PREFIX + t for t in PROMPTS])
    first = _engine(llama, block_size=8, prefix_caching=False)
    want = [eng.generate(first, [p], 16, ignore_eos=True)[0].token_ids for p in shared]
    assert first.blocks.hits == 0
    e = _engine(llama, block_size=8)
    e.overlap = e.graphed_prompts = overlap
    got = [eng.generate(e, [p], 16, ignore_eos=True)[0].token_ids for p in shared]  # one after another: hits
    assert got == want
    prefix_blocks = (len(_ids(tok, [PREFIX])[0]) - 1) // 8
    assert e.blocks.hits >= 3 * prefix_blocks * 8 and "prefix cache hit rate 0." in e.summary()
    together = eng.generate(e, shared, 16, ignore_eos=True)  # all at once, over cached blocks
    assert [o.token_ids for o in together] == want
    _check_pool(e)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_preempted_sequences_resume_with_the_same_tokens_and_the_pool_is_never_exceeded(llama, overlap, attention):
    """A pool of 10 blocks of 8 tokens for 3 sequences of up to ~70: they cannot all grow; the newest gives its
    blocks back, waits, and is recomputed (prompt and output so far) with the same greedy tokens."""
    tok = llama[0]
    prompts = _ids(tok, PROMPTS[:3])
    want = [o.token_ids for o in eng.generate(_engine(llama, total=72, kv_cache="slots"), prompts, 50, ignore_eos=True)]
    e = _engine(llama, total=72, block_size=8, cache_blocks=10, prefix_caching=False)
    if attention == "kernel":
        e.decoder.use_paged_kernel()
    e.overlap = e.graphed_prompts = overlap
    finals = _submit(e, prompts, 50)
    most = 0
    while len(finals) < len(prompts):
        e.step()
        _check_pool(e)
        assert e.blocks.used <= 10 and e.load()[2] == e.blocks.used / 10  # the metrics' cache usage: the pool's
        most = max(most, len(e.running))
    assert [finals[i].token_ids for i in range(3)] == want
    assert e.preempted >= 1 and most >= 2 and e.blocks.used == 0


def test_requests_wait_for_blocks_and_none_is_dropped(llama):
    """More prompt than the pool holds at once: admission takes what fits, the rest wait their turn."""
    tok = llama[0]
    prompts = _ids(tok, [PREFIX + t for t in PROMPTS])
    assert all(len(p) + 1 > 5 * 8 for p in prompts)  # 6 blocks or more each, with the first decoded token
    e = _engine(llama, slots=4, total=88, block_size=8, cache_blocks=11, prefix_caching=False)
    finals = _submit(e, prompts, 6)
    e.step()
    assert len(e.running) == 1 and len(e.waiting) == 3  # one fits, though 3 slots are free
    while len(finals) < len(prompts):
        e.step()
        _check_pool(e)
    assert all(len(finals[i].token_ids) == 6 for i in range(4))


def test_short_requests_in_a_long_context_cache_run_4x_more_than_slots_would(llama):
    """max_total_tokens 8192 with the memory of 4 slots (32768 tokens): requests of 128-512 tokens run 8 at once
    and more, where the slot layout runs 4."""
    tok = llama[0]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(124, 508, (16,), generator=g)]
    e = _engine(llama, slots=16, total=8192, chunk=2048, block_size=16, cache_blocks=4 * 8192 // 16)
    finals = _submit(e, prompts, 4)
    most = 0
    while len(finals) < len(prompts):
        e.step()
        most = max(most, len(e.running))
    assert most == 16 and not e.waiting and e.preempted == 0  # every request at once: 4x the 4 slots and more


def test_a_pool_smaller_than_one_sequence_is_refused(llama):
    with pytest.raises(ValueError, match="cannot hold one sequence of max_total_tokens 96"):
        _engine(llama, block_size=8, cache_blocks=11)


def test_the_cache_settings_reach_the_served_config(tmp_path):
    from tiny_llm import build_cli, spec_text

    from builder.render import parse_config

    gen = ("{max_sequences: 2, max_prompt_tokens: 64, max_total_tokens: 128, max_tokens: 16, kv_cache: paged, "
           "block_size: 32, prefix_caching: false, cache_tokens: 512}")
    result, repo = build_cli(tmp_path, spec_text(make_model_dir(tmp_path / "m"), generation=gen))
    assert result.exit_code == 0, result.output
    params = {k: v.string_value for k, v in parse_config((repo / "tiny" / "config.pbtxt").read_text()).parameters.items()}
    assert {k: params[k] for k in ("kv_cache", "block_size", "prefix_caching", "cache_tokens")} == \
        {"kv_cache": "paged", "block_size": "32", "prefix_caching": "0", "cache_tokens": "512"}
    assert (repo / "tiny" / "1" / "blocks.py").is_file()  # the engine imports it beside itself


def test_a_cache_smaller_than_one_sequence_is_refused_in_the_spec():
    from pydantic import ValidationError

    from builder.spec import Generation

    with pytest.raises(ValidationError, match="cache_tokens .100. cannot hold one sequence of max_total_tokens .128."):
        Generation(max_prompt_tokens=64, max_total_tokens=128, max_tokens=16, cache_tokens=100)


@pytest.mark.gpu
def test_block_tables_through_cuda_graphs_give_the_slot_caches_tokens(llama):
    """The served GPU setup over a paged cache: graphed steps read the block table where it is, tables change
    between replays (admission, growth, preemption with overlap), and the tokens equal the slot cache's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from builder.generation.decoder import Graphs

    tok, config, weights = llama
    weights = {k: v.cuda() for k, v in weights.items()}
    prompts = _ids(tok, PROMPTS[:3] + [PREFIX])

    def run(kv, **options):
        dec = Decoder(config, weights)
        e = eng.Engine(dec, tok, max_sequences=3, max_total_tokens=72, prefill_chunk=5, kv_cache=kv, **options)
        e.decode_step, e.graphed_prompts, e.overlap = Graphs(dec, length_bucket=16, max_rows=3 + 5), True, True
        return e, [o.token_ids for o in eng.generate(e, prompts, 40, ignore_eos=True)]

    _, want = run("slots")
    e, got = run("paged", block_size=8)
    assert got == want
    e, got = run("paged", block_size=8, cache_blocks=10)  # too few blocks for 3: preemption between replays
    assert got == want and e.preempted >= 1
