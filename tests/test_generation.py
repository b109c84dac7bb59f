"""Generation, in-process: the decoder against HF `generate`, the engine's continuous batching,
streaming, stop strings, queueing and cancellation, and the build's refusals."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from builder.cli import app
from builder.generation import engine as eng
from builder.generation import hf2decoder
from builder.generation.decoder import Decoder
from tiny_llm import ARCHS, build_cli, make_model_dir, spec_text


def _loaded(path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("llama"), "llama")
    return _loaded(path)


def _engine(tok, model, slots=3, total=96, chunk=5):
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    return eng.Engine(Decoder(config, weights), tok, max_sequences=slots, max_total_tokens=total, prefill_chunk=chunk)


PROMPTS = ["Triton serves models", "The quick brown fox jumps over the lazy dog.", "Ünïcödé 🚀", "Continuous"]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_greedy_tokens_equal_hf_generate(arch, tmp_path):
    tok, model = _loaded(make_model_dir(tmp_path, arch))
    engine = _engine(tok, model)
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        x = torch.tensor([ids])
        want = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
        want = want[:want.index(tok.eos_token_id)] if tok.eos_token_id in want else want
        got = eng.generate(engine, [ids], 12)[0]
        assert got.token_ids == want, (arch, text)


def test_requests_decoded_together_equal_their_solo_answers(llama):
    tok, model = llama
    engine = _engine(tok, model, slots=3)  # 4 prompts, 3 slots: one waits in the queue, none is dropped
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    solo = [eng.generate(engine, [p], 20)[0] for p in prompts]
    together = eng.generate(engine, prompts, 20)
    assert [o.token_ids for o in together] == [o.token_ids for o in solo]
    assert all(o.finished and o.finish_reason in ("stop", "length") for o in together)
    assert engine.free and len(engine.free) == 3 and not engine.running  # every slot back
    # the step clock (logged by the served model at unload): every step that ran the model, its rows
    assert engine.clocked == engine.steps > 0 and engine.clocked_rows >= sum(len(o.token_ids) for o in together)
    line = engine.summary()
    assert line.startswith(f"{engine.steps} steps, ") and all(f"{k} " in line for k in ("plan", "model", "wait", "advance", "between"))


def _scenario(engine, tok, sampled: bool):
    """Requests of several lengths and limits arriving over time (one waits for a slot, one is cancelled, one
    has a stop string, one hits max_total_tokens); every output in order of arrival."""
    outs: dict[int, list] = {}
    steps = [0]
    plan = [(0, PROMPTS[0], dict(max_tokens=9)), (0, PROMPTS[1], dict(max_tokens=40, stream=True)),
            (0, PROMPTS[2], dict(max_tokens=14, stop=("@",), stream=True)),
            (3, PROMPTS[3], dict(max_tokens=25, cancelled=lambda: steps[0] > 20)),
            (6, PROMPTS[0] + " again", dict(max_tokens=60, stream=True))]
    if sampled:
        plan.append((8, PROMPTS[3], dict(max_tokens=10, temperature=0.8, seed=3)))
    while plan or engine.running or engine.waiting or not engine.inbox.empty() or engine.ahead is not None:
        while plan and plan[0][0] <= steps[0]:
            _, text, kw = plan.pop(0)
            i = len(outs)
            outs[i] = []
            engine.submit(eng.Request(tok(text)["input_ids"], emit=outs[i].append, **kw))
        engine.step()
        steps[0] += 1
    return [[(o.text, o.finished, o.finish_reason, o.token_ids) for o in v] for v in outs.values()]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "with-a-sampled-request"])
def test_overlapped_decode_steps_give_the_same_outputs(llama, sampled, monkeypatch):
    """Engine.overlap (on with CUDA graphs): step N+1 is launched from step N's tokens on the device before N is
    read. Same outputs as the plain engine through arrivals, a wait for a slot, cancellation, a stop string,
    max_tokens and max_total_tokens, and a sampled request (drawn on the device in overlapped steps too)."""
    tok, model = llama
    plain = _scenario(_engine(tok, model, slots=3, total=48), tok, sampled)
    engine = _engine(tok, model, slots=3, total=48)
    engine.overlap = engine.graphed_prompts = True  # as served with CUDA graphs: prompt chunks overlap too
    launches = []
    real = engine._launch
    monkeypatch.setattr(engine, "_launch", lambda *a: launches.append(real(*a)) or launches[-1])
    overlapped = _scenario(engine, tok, sampled)
    assert overlapped == plain
    launched = [a for a in launches if a is not None]
    assert len(launched) >= 20 and max(len(a.reqs) for a in launched) == 3  # most steps overlapped, all slots busy
    assert any(a.rows > len(a.reqs) for a in launched)  # prompt chunks in overlapped steps
    reasons = [o[-1][2] for o in plain]  # a cancelled request ends with "cancelled"
    assert reasons[3] == "cancelled" and {"length", "stop"} <= set(reasons) and all(o[-1][1] for o in plain if o)
    assert max(len(o[-1][3] or ()) for o in plain) > 20  # some ran past 20 tokens: the 48-token total bound it
    assert engine.ahead is None and len(engine.free) == 3


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlapped"])
def test_a_failing_step_fails_its_requests_and_the_engine_serves_on(llama, overlap):
    tok, model = llama
    engine = _engine(tok, model)
    engine.overlap = engine.graphed_prompts = overlap
    real, calls = engine.decoder.decode, []

    def flaky(*args):  # the 4th step fails (a CUDA error, say), then the device works again
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return real(*args)

    engine.decode_step = flaky
    failed = eng.generate(engine, [tok(PROMPTS[0])["input_ids"]], 20)
    assert failed[0].finished and failed[0].error == "generation failed: RuntimeError: device lost"
    assert engine.ahead is None and not engine.running and len(engine.free) == 3
    again = eng.generate(engine, [tok(PROMPTS[0])["input_ids"]], 20)
    assert again[0].error is None and again[0].finish_reason in ("length", "stop") and again[0].token_ids


def test_a_step_that_fails_outside_the_model_answers_every_request_and_the_engine_runs_on(llama, monkeypatch):
    import threading

    tok, model = llama
    engine = _engine(tok, model, slots=1)  # one runs, one waits: both must be answered
    real, calls = engine._plan, []
    monkeypatch.setattr(engine, "_plan", lambda *a: calls.append(1) or (1 / 0 if len(calls) == 3 else real(*a)))
    answers = {i: threading.Event() for i in range(3)}
    finals = {}

    def keep(i):
        return lambda out: out.finished and (finals.__setitem__(i, out), answers[i].set())

    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    for i in range(2):
        engine.submit(eng.Request(tok(PROMPTS[i])["input_ids"], 20, emit=keep(i)))
    thread.start()
    try:
        assert answers[0].wait(60) and answers[1].wait(60)
        assert {finals[i].error for i in (0, 1)} == {"generation failed: ZeroDivisionError: division by zero"}
        engine.submit(eng.Request(tok(PROMPTS[2])["input_ids"], 5, emit=keep(2)))
        assert answers[2].wait(60) and finals[2].error is None and finals[2].token_ids
    finally:
        stop.set()
        thread.join(10)


def _on_cuda(llama):
    """The tiny llama's tokenizer, decoder config and weights on the GPU (the test is skipped without one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    return tok, config, {k: v.cuda() for k, v in weights.items()}


@pytest.mark.gpu
def test_overlapped_steps_with_cuda_graphs_give_the_same_outputs(llama):
    """The served GPU setup: graphed steps, prompts through the graphs, overlap with pinned copies and events."""
    from builder.generation.decoder import Graphs

    tok, config, weights = _on_cuda(llama)

    def engine(overlap):
        dec = Decoder(config, weights)
        e = eng.Engine(dec, tok, max_sequences=3, max_total_tokens=48, prefill_chunk=5)
        e.decode_step, e.graphed_prompts, e.overlap = Graphs(dec, length_bucket=16, max_rows=3 + 5), True, overlap
        if overlap:
            e.warm()  # as the server does at load on a GPU
        return e

    for sampled in (False, True):  # a sampled request's draws happen on the device, overlapped or not
        assert _scenario(engine(True), tok, sampled) == _scenario(engine(False), tok, sampled)


def test_warming_the_sampler_changes_nothing(llama):
    """Engine.warm (the server runs it at load on a GPU) leaves the slots free and a seeded draw as it was."""
    tok, model = llama
    ids = tok(PROMPTS[0])["input_ids"]
    cold, warm = _engine(tok, model), _engine(tok, model)
    warm.warm()
    assert warm.free == cold.free and warm.steps == 0 and not warm.running and not warm.waiting
    kw = dict(temperature=1.0, top_p=0.9, seed=3, ignore_eos=True)
    assert eng.generate(warm, [ids], 8, **kw)[0].token_ids == eng.generate(cold, [ids], 8, **kw)[0].token_ids


def test_streamed_pieces_add_up_to_the_text_and_never_split_a_character(llama):
    tok, model = llama
    engine = _engine(tok, model)
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        whole = eng.generate(engine, [ids], 40, ignore_eos=True)[0]
        pieces: list[eng.Output] = []
        engine.submit(eng.Request(ids, 40, emit=pieces.append, stream=True, ignore_eos=True))
        while not (pieces and pieces[-1].finished):
            engine.step()
        assert "".join(p.text for p in pieces) == whole.text == tok.decode(whole.token_ids, skip_special_tokens=True)
        if "\ufffd" not in whole.text:  # an incomplete UTF-8 sequence is never released as a piece
            assert all("\ufffd" not in p.text for p in pieces)
        assert [p.finished for p in pieces].count(True) == 1 and pieces[-1].finish_reason == "length"


def test_bytes_that_never_form_a_character_do_not_grow_the_detokenizer_window(llama):
    """A model that emits stray UTF-8 continuation bytes (random weights do) still streams, and each decode
    stays short: the window is released after HOLD_TOKENS tokens instead of growing with the output."""
    tok, _ = llama
    stray = next(t for t in range(tok.vocab_size) if tok.decode([t]) == "\ufffd")
    d = eng.Detokenizer(tok, tok("Hello")["input_ids"])
    pieces, widest = [], 0
    for _ in range(40):
        pieces.append(d.add(stray))
        widest = max(widest, len(d.ids) - d.prefix)
    assert sum(1 for p in pieces if p) >= 3 and "\ufffd" in "".join(pieces)
    assert widest <= 2 * eng.HOLD_TOKENS + 2  # the released window and the held one; unbounded it was 45


def test_stream_interval_sends_the_first_token_at_once_then_every_n_tokens(llama):
    """Each streamed response is a round trip to Triton (~150-370 µs from the stub): after the first token, one
    response per stream_interval tokens; the pieces still add up to the whole text."""
    tok, model = llama
    ids = tok(PROMPTS[0])["input_ids"]
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    engine = eng.Engine(Decoder(config, weights), tok, max_sequences=3, max_total_tokens=96, prefill_chunk=5,
                        stream_interval=3)
    whole = eng.generate(engine, [ids], 20, ignore_eos=True)[0]
    pieces: list[eng.Output] = []
    engine.submit(eng.Request(ids, 20, emit=pieces.append, stream=True, ignore_eos=True))
    while not (pieces and pieces[-1].finished):
        engine.step()
    assert "".join(p.text for p in pieces) == whole.text
    counts = [p.num_output_tokens for p in pieces[:-1]]
    assert counts[0] <= 2 and all(b - a >= 3 for a, b in zip(counts, counts[1:]))  # a held-back byte may delay one
    assert len(pieces) <= 1 + -(-19 // 3) + 1


def test_automatic_stream_interval_grows_with_the_running_sequences(llama):
    tok, model = llama
    ids = tok(PROMPTS[3])["input_ids"]
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    engine = eng.Engine(Decoder(config, weights), tok, max_sequences=20, max_total_tokens=96, prefill_chunk=200)
    streams: dict[int, list[eng.Output]] = {i: [] for i in range(2 + eng.ROWS_PER_STEP * 2)}
    few = streams.keys() - {0, 1}
    for i in (0, 1):  # two sequences: a response per token
        engine.submit(eng.Request(ids, 24, emit=streams[i].append, stream=True, ignore_eos=True))
    for _ in range(6):
        engine.step()
    assert engine.interval == 1  # two sequences: one response per token
    for i in few:  # 18 sequences: 18 / 8 rounded up = 3 tokens per response
        engine.submit(eng.Request(ids, 24, emit=streams[i].append, stream=True, ignore_eos=True))
    while any(not (s and s[-1].finished) for s in streams.values()):
        engine.step()
        if len(engine.running) == len(streams):
            assert engine.interval == 3
    for i in few:  # 3 tokens per response while all 18 run; fewer once the first ones finish
        counts = [p.num_output_tokens for p in streams[i][:-1]]
        assert max(b - a for a, b in zip(counts, counts[1:])) >= 3 and len(streams[i]) <= 12  # 25 at 1 per token


def test_cancellation_is_polled_every_step_only_while_requests_wait(llama):
    """sender.is_cancelled() is a round trip to Triton: polled every CANCEL_EVERY steps when no request waits."""
    tok, model = llama
    engine = _engine(tok, model, slots=2, total=200)
    ids = tok(PROMPTS[0])["input_ids"]
    polls = {"a": 0}

    def cancelled():
        polls["a"] += 1
        return False

    engine.submit(eng.Request(ids, 150, emit=lambda o: None, ignore_eos=True, cancelled=cancelled))
    for _ in range(eng.CANCEL_EVERY * 2):
        engine.step()
    assert 1 <= polls["a"] <= 3


def test_stop_string_cuts_the_text_and_finishes_with_stop(llama):
    tok, model = llama
    engine = _engine(tok, model)
    ids = tok(PROMPTS[1])["input_ids"]
    free = eng.generate(engine, [ids], 30, ignore_eos=True)[0].text
    stop = free[10:13]
    assert stop and stop in free
    for stream in (False, True):
        pieces: list[eng.Output] = []
        engine.submit(eng.Request(ids, 30, emit=pieces.append, stream=stream, stop=(stop,), ignore_eos=True))
        while not (pieces and pieces[-1].finished):
            engine.step()
        text = "".join(p.text for p in pieces)
        assert text == free[:free.index(stop)]
        assert pieces[-1].finish_reason == "stop"


def test_cancelled_request_frees_its_slot_for_a_waiting_one(llama):
    tok, model = llama
    engine = _engine(tok, model, slots=2, total=200)
    ids = tok(PROMPTS[0])["input_ids"]
    cancelled = {"a": False}
    done: dict[str, eng.Output] = {}
    engine.submit(eng.Request(ids, 150, emit=lambda o: done.__setitem__("a", o), ignore_eos=True,
                              cancelled=lambda: cancelled["a"]))
    engine.submit(eng.Request(ids, 150, emit=lambda o: done.__setitem__("b", o) if o.finished else None, ignore_eos=True))
    engine.submit(eng.Request(ids, 5, emit=lambda o: done.__setitem__("c", o) if o.finished else None, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 1 and not engine.free  # all slots used; c waits
    cancelled["a"] = True
    for _ in range(8):
        engine.step()
    assert "c" in done and done["c"].num_output_tokens == 5  # served in the slot a gave back
    # a ends with its final output (Triton releases a request only after one); b still decodes
    assert done["a"].finished and done["a"].finish_reason == "cancelled" and "b" not in done


def _draws(logits: list[float], n: int, **options) -> torch.Tensor:
    """n draws of one request over fixed logits, one row per position (as n decode steps would draw them)."""
    req = eng.Request([1], n, emit=lambda o: None, seed=11, **options)
    return eng.pick(torch.tensor([logits] * n), [req] * n, list(range(n)))


@pytest.mark.parametrize("options, want", [
    ({"temperature": 1.0}, torch.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]), 0)),
    ({"temperature": 0.5}, torch.softmax(torch.tensor([4.0, 2.0, 1.0, 0.0, -2.0]), 0)),
    ({"temperature": 1.0, "top_k": 2}, torch.tensor([0.7311, 0.2689, 0, 0, 0])),  # softmax over the top two
    # top_p 0.8 over probs .563/.207/.126/.076/.028: the third crosses 0.8 and is kept, the fourth is not
    ({"temperature": 1.0, "top_p": 0.8}, torch.tensor([0.5630, 0.2071, 0.1256, 0, 0]) / 0.8957),
], ids=["t1", "t0.5", "top_k", "top_p"])
def test_device_sampling_draws_from_the_cut_softmax(options, want):
    """pick(): temperature, top-k and top-p on the device for all rows at once, drawn at a hashed uniform number
    through the kept probabilities' running sum: 20,000 draws match the distribution each option defines (tokens outside it never come)."""
    drawn = _draws([2.0, 1.0, 0.5, 0.0, -1.0], 20000, **options)
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert torch.allclose(freq, want.float(), atol=0.012), (freq, want)
    assert (freq[want == 0] == 0).all()


def test_rows_with_different_cuts_in_one_step_each_draw_from_their_own():
    """One pick() over rows whose options differ (top-k, top-p, both, temperature only, greedy): the cuts are
    computed per row, so each row's draws follow its own distribution, whatever the others ask for."""
    base = [2.0, 1.0, 0.5, 0.0, -1.0]
    groups = [({"temperature": 1.0, "top_k": 2}, torch.tensor([0.7311, 0.2689, 0, 0, 0])),
              ({"temperature": 1.0, "top_p": 0.8}, torch.tensor([0.5630, 0.2071, 0.1256, 0, 0]) / 0.8957),
              ({"temperature": 0.5}, torch.softmax(torch.tensor(base) * 2, 0)),
              ({}, torch.tensor([1.0, 0, 0, 0, 0])),
              # top-p over the top 3 renormalized (.629/.231/.140): the third's preceding sum .860 > .8, it goes; over
              # the whole softmax it would stay (.770)
              ({"temperature": 1.0, "top_k": 3, "top_p": 0.8}, torch.tensor([0.7311, 0.2689, 0, 0, 0]))]
    k, n = len(groups), 10000 * len(groups)
    reqs = [eng.Request([1], n, emit=lambda o: None, seed=11 + g, **groups[g][0]) for g in range(k)]
    drawn = eng.pick(torch.tensor([base] * n), [reqs[i % k] for i in range(n)], list(range(n)))
    for g, (_, want) in enumerate(groups):
        freq = torch.bincount(drawn[g::k], minlength=5).float() / (n // k)
        assert torch.allclose(freq, want.float(), atol=0.015), (g, freq, want)
        assert (freq[want == 0] == 0).all()


def test_device_sampling_depends_on_seed_and_position_only():
    """A request draws the same tokens alone or beside others (greedy or sampled), so overlapped and plain steps,
    and any batch, give a seeded request the same text; greedy rows stay argmax; another seed draws otherwise."""
    logits = torch.randn(4, 50)
    a = eng.Request([1], 9, emit=lambda o: None, temperature=1.2, top_p=0.9, seed=5)
    greedy = eng.Request([1], 9, emit=lambda o: None)
    other = eng.Request([1], 9, emit=lambda o: None, temperature=0.7, top_k=5, seed=6)
    alone = eng.pick(logits[:1], [a], [30])
    mixed = eng.pick(logits[[3, 1, 0, 2]], [greedy, other, a, other], [7, 8, 30, 9])
    assert mixed[2] == alone[0] and mixed[0] == logits[3].argmax()
    draws = {int(eng.pick(logits[:1], [eng.Request([1], 9, emit=lambda o: None, temperature=1.2, seed=s)], [30])[0])
             for s in range(40)}
    assert len(draws) > 5  # the seed matters
    top = eng.Request([1], 9, emit=lambda o: None, temperature=1.0, seed=2**64 - 1)  # the largest UINT64 seed
    assert 0 <= int(eng.pick(logits[:1], [top], [3])[0]) < 50
    def text(seed):  # 20 draws of one request
        req = eng.Request([1], 9, emit=lambda o: None, temperature=1.2, seed=seed)
        return [int(eng.pick(logits[:1], [req], [p])[0]) for p in range(20)]

    assert text(5) != text(5 + 2**63)  # every bit of a UINT64 seed counts


def test_sampling_is_reproducible_with_a_seed(llama):
    tok, model = llama
    engine = _engine(tok, model)
    ids = tok(PROMPTS[2])["input_ids"]
    first = eng.generate(engine, [ids], 12, temperature=1.5, top_p=0.9, top_k=50, seed=7, ignore_eos=True)[0]
    again = eng.generate(engine, [ids], 12, temperature=1.5, top_p=0.9, top_k=50, seed=7, ignore_eos=True)[0]
    greedy = eng.generate(engine, [ids], 12, ignore_eos=True)[0]
    assert first.token_ids == again.token_ids
    assert first.token_ids != greedy.token_ids


def test_build_writes_a_verified_generator(tmp_path):
    model_dir = make_model_dir(tmp_path / "m", "llama")
    result, out = build_cli(tmp_path, spec_text(model_dir, variants="[{format: torch, precision: fp32}, {format: torch, "
                                                                    "precision: bf16}, {format: torch, precision: int8}]"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "triton-builder.json").read_text())["models"]
    assert set(manifest) == {"tiny", "tiny_torch_bf16", "tiny_torch_int8"}
    fp32 = manifest["tiny"]["verification"]
    assert fp32["greedy_equal_to_hf"] == fp32["prompts"] == 4 and fp32["continuous_batching_equal"] == 4
    assert manifest["tiny_torch_bf16"]["verification"]["min_cosine"] > 0.99
    int8 = manifest["tiny_torch_int8"]["verification"]  # weight-only int8 (torchao) over bf16 activations
    assert int8["min_cosine"] > 0.98 and abs(int8["perplexity"] / fp32["perplexity"] - 1) < 0.05
    assert 'string_value: "int8"' in (out / "tiny_torch_int8" / "config.pbtxt").read_text()
    files = {f.name for f in (out / "tiny" / "1").iterdir()}
    assert {"model.py", "decoder.py", "engine.py", "decoder.json", "weights.safetensors", "tokenizer.json"} <= files
    assert CliRunner().invoke(app, ["validate", str(out)]).exit_code == 0


@pytest.mark.parametrize("case,edit,expected", [
    ("config_source", lambda t, d: t.replace(f"{{path: {d}}}", "{config: {model_type: llama, vocab_size: 100}}"),
     "models[tiny]: source: generation needs a tokenizer; give path, hf or package (a model directory or a .gguf "
     "file with its tokenizer), or write generation: false to export logits only"),
    ("too_long", lambda t, d: t.replace("max_total_tokens: 128", "max_total_tokens: 1000"),
     "models[tiny]: generation.max_total_tokens: 1000 is above the model's max_position_embeddings (512); lower it"),
])
def test_build_refuses_with_one_line(case, edit, expected, tmp_path):
    model_dir = make_model_dir(tmp_path / "m", "llama")
    result, _ = build_cli(tmp_path, edit(spec_text(model_dir), model_dir))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {expected}"
    assert "Traceback" not in result.output and not (tmp_path / "repo").exists()


def test_unsupported_architecture_is_refused_before_work(tmp_path):
    import transformers

    path = tmp_path / "gpt2"
    make_model_dir(tmp_path / "tok", "llama")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    result, _ = build_cli(tmp_path, spec_text(path))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: models[tiny]: model_type 'gpt2' is not supported for generation yet; supported: "
        f"{hf2decoder.supported()} (or write generation: false to export logits only)")


def test_one_spec_renders_our_endpoint_tensorrt_llm_and_vllm(tmp_path):
    model_dir = make_model_dir(tmp_path / "m", "qwen2")
    result, out = build_cli(tmp_path, spec_text(model_dir, variants="[{format: torch, precision: fp32}, {format: vllm, "
                                                                    "precision: bf16}, {format: tensorrt-llm, precision: bf16}]"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "triton-builder.json").read_text())["models"]
    assert manifest["tiny"]["status"] == "passed"
    assert {n: e["status"] for n, e in manifest.items() if n != "tiny"} == {
        "tiny_vllm_bf16": "rendered", "tiny_tensorrt-llm_bf16": "rendered"}
    engine_args = json.loads((out / "tiny_vllm_bf16" / "1" / "model.json").read_text())
    assert engine_args["max_num_seqs"] == 2 and engine_args["max_model_len"] == 128 and engine_args["dtype"] == "bfloat16"
    assert (out / "tiny_vllm_bf16" / "hf" / "config.json").is_file()  # the weights travel with the repository
    assert CliRunner().invoke(app, ["validate", str(out)]).exit_code == 0


def test_batched_decode_and_its_padding_give_the_rows_of_the_ragged_step(llama):
    """The tensor-only decode step (what CUDA graphs replay) equals the ragged step row for row, also with rows
    padded into the scratch slot as a graph bucket pads them; buckets cover every batch and length."""
    from builder.generation.decoder import Graphs

    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    dec = Decoder(config, weights)
    dec.allocate(3, 64)
    lengths = [5, 11, 8]
    for slot, n in enumerate(lengths):
        dec(torch.randint(3, 200, (n,)), [(slot, 0, n)])
    snapshot = [c.clone() for c in dec.k_cache + dec.v_cache]
    tokens, slots, positions = torch.tensor([7, 9, 11]), torch.tensor([2, 0, 1]), torch.tensor([8, 5, 11])

    def restore():
        for c, saved in zip(dec.k_cache + dec.v_cache, snapshot):
            c.copy_(saved)

    ragged = dec(tokens, [(2, 8, 1), (0, 5, 1), (1, 11, 1)])
    restore()
    batched = dec.decode(tokens, slots, positions, 12)
    restore()
    pad = lambda t, value: torch.nn.functional.pad(t, (0, 1), value=value)  # noqa: E731
    padded = dec.decode(pad(tokens, 0), pad(slots, dec.scratch), pad(positions, 0), 32)
    torch.testing.assert_close(batched, ragged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[:3], batched, rtol=1e-5, atol=1e-5)
    graphs = Graphs.__new__(Graphs)
    Graphs.__init__(graphs, dec, length_bucket=16, max_rows=3 + 8)  # capture() needs CUDA; bucketing does not
    assert [graphs.bucket(b, n) for b, n in [(1, 1), (2, 17), (3, 64)]] == [(1, 16, False), (2, 32, False), (3, 64, False)]
    assert graphs.bucket(9, 5, True) == (11, 16, True) and graphs.bucket(2, 5, True) == (4, 16, True)
    assert graphs.keys() == [(b, 16, False) for b in (1, 2, 3)] + [(b, 16, True) for b in (4, 8, 11)]


@pytest.mark.parametrize("min_rows, compilations", [(1, 3), (2, 2)])
def test_the_graphs_a_server_captures_take_two_compilations(llama, min_rows, compilations):
    """Loading a model with compile: inductor compiles decode() once per distinct guard set, a minute or more
    each on the H100: a 1-row bucket, the other decode-only buckets, and every mixed bucket together (above the
    slots, `picks` of `slots` rows); the server starts its buckets at 2 rows (min_rows) and so compiles twice.
    Counted with a backend that only records what dynamo hands it."""
    from builder.generation.decoder import Graphs

    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    dec = Decoder(config, weights)
    dec.allocate(8, 512)
    compiled = []
    step = torch.compile(dec.decode, dynamic=True, backend=lambda gm, _: compiled.append(gm) or gm.forward)
    graphs = Graphs(dec, step, max_rows=8 + 128, min_rows=min_rows)
    for rows, length, mixed in graphs.keys():
        zeros = lambda n: torch.zeros(n, dtype=torch.long)  # noqa: E731 - what capture() feeds
        extra = (zeros(1), zeros(dec.scratch)) if mixed else ()
        step(zeros(rows), torch.full((rows,), dec.scratch), zeros(rows), length, *extra)
    assert len(graphs.keys()) == 13 - min_rows and len(compiled) == compilations
    assert graphs.bucket(1, 5) == (min_rows, 256, False)  # one stream's steps replay the smallest bucket


def test_a_mixed_step_gives_the_logits_of_the_ragged_step(llama):
    """decode() with prompt rows (`decoding`, `picks`: how graphed steps run prompt chunks): decoding rows, then
    a chunk that continues a prompt (its prefix is in the cache), then a new prompt's first chunk, padded as a
    graph bucket pads them: the picked rows' logits equal the ragged forward's, and so does the cache after it."""
    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    dec = Decoder(config, weights)
    dec.allocate(4, 64)
    for slot, n in [(0, 7), (1, 12), (2, 6)]:  # slot 2: a prompt whose first 6 tokens went in an earlier step
        dec(torch.randint(3, 200, (n,)), [(slot, 0, n)])
    snapshot = [c.clone() for c in dec.k_cache + dec.v_cache]
    seqs = [(0, 7, 1), (1, 12, 1), (2, 6, 5), (3, 0, 4)]
    tokens = torch.randint(3, 200, (11,))
    ragged = dec(tokens, seqs)
    after = [c.clone() for c in dec.k_cache + dec.v_cache]
    for c, saved in zip(dec.k_cache + dec.v_cache, snapshot):
        c.copy_(saved)
    slots, positions = eng.rows_of(seqs)
    pad = lambda t, value: torch.nn.functional.pad(torch.tensor(t), (0, 3), value=value)  # noqa: E731
    mixed = dec.decode(pad(tokens.tolist(), 0), pad(slots, dec.scratch), pad(positions, 0), 16,
                       torch.tensor([2]), torch.tensor([0, 1, 6, 10]))
    torch.testing.assert_close(mixed, ragged, rtol=1e-5, atol=1e-5)
    for c, want in zip(dec.k_cache + dec.v_cache, after):
        torch.testing.assert_close(c[:4], want[:4])  # every real slot; the scratch slot took the padding


def test_prompt_steps_through_the_tensor_only_step_give_the_same_tokens(llama):
    """On a GPU with graphs the engine feeds prompt chunks through decode() (a row per prompt token) instead of
    the ragged forward: the same greedy tokens, with chunked prefill and decoding rows in the same steps."""
    tok, model = llama
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    ragged = _engine(tok, model, slots=3, total=96, chunk=5)
    flat = _engine(tok, model, slots=3, total=96, chunk=5)
    flat.graphed_prompts = True
    calls = []
    step = flat.decode_step
    flat.decode_step = lambda *a: calls.append(a[0].shape[0]) or step(*a)
    want = eng.generate(ragged, prompts, 12, ignore_eos=True)
    got = eng.generate(flat, prompts, 12, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert max(calls) > 3  # prompt tokens went through decode(), several rows of one sequence in a call
    assert not flat.running and len(flat.free) == 3


def test_only_the_first_chunk_of_a_step_continues_a_prompt(llama):
    """Mixed steps give the cached prefix to the step's first prompt chunk only (Decoder.decode): a prompt that
    is under way and not first waits for the next step, whatever the budget."""
    tok, model = llama
    engine = _engine(tok, model, slots=3, total=96, chunk=64)
    new, started, other = (eng.Request(list(range(5, 5 + n)), 4, emit=lambda o: None) for n in (6, 9, 7))
    started.fed = 4
    _, seqs, _, _ = engine._plan([], [new, started, other])
    assert [n for _, _, n in seqs] == [6]  # `started` waits, and `other` behind it
    _, seqs, _, _ = engine._plan([], [started, new, other])
    assert [(start, n) for _, start, n in seqs] == [(4, 5), (0, 6), (0, 7)]


def test_the_gpu_bench_spec_is_valid_for_every_variant(tmp_path):
    """perf/gpu/llm_bench.py builds this exact spec on the GPU machine: it must load (graphs, inductor, int8, int4)."""
    import sys
    from pathlib import Path

    from builder.spec import load_spec

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf" / "gpu"))
    import llm_bench

    spec = tmp_path / "llm.yaml"
    (tmp_path / "model").mkdir()
    spec.write_text(llm_bench.spec_text(tmp_path / "model", "gpu", 32, 128, 128, llm_bench.VARIANTS))
    model = load_spec(spec).models[0]
    assert [v.tag for v in model.variants] == ["torch_bf16", "torch_bf16_graphs", "torch_bf16_inductor_graphs",
                                              "torch_int8_inductor_graphs", "torch_int4_inductor_graphs"]
    assert model.generation.max_sequences == 32 and model.generation.max_total_tokens >= 256 + 64


@pytest.mark.gpu
def test_cuda_graph_replays_equal_the_eager_decode_step(llama):
    from builder.generation.decoder import Graphs

    _, config, weights = _on_cuda(llama)
    dec = Decoder(config, weights)
    dec.allocate(4, 64)
    for slot in range(4):
        dec(torch.randint(3, 200, (9,), device="cuda"), [(slot, 0, 9)])
    graphs = Graphs(dec, length_bucket=16)
    for rows in (1, 3, 4):
        tokens = torch.randint(3, 200, (rows,), device="cuda")
        slots, positions = torch.arange(rows, device="cuda"), torch.full((rows,), 9, device="cuda")
        eager = dec.decode(tokens, slots, positions, 10).clone()
        torch.testing.assert_close(graphs(tokens, slots, positions, 10), eager, rtol=1e-4, atol=1e-4)
    # 2 decoding rows, then a chunk of 8 tokens continuing slot 0's prompt: 10 rows, above the slots (a mixed step)
    graphs = Graphs(dec, length_bucket=16, max_rows=4 + 8)
    tokens = torch.randint(3, 200, (10,), device="cuda")
    slots = torch.tensor([1, 2] + [0] * 8, device="cuda")
    positions = torch.tensor([9, 9] + list(range(9, 17)), device="cuda")
    mixed = (torch.tensor([2], device="cuda"), torch.tensor([0, 1, 9], device="cuda"))
    eager = dec.decode(tokens, slots, positions, 17, *mixed).clone()
    torch.testing.assert_close(graphs(tokens, slots, positions, 17, *mixed), eager, rtol=1e-4, atol=1e-4)
    assert list(graphs.graphs) == [(12, 32, True)]  # the mixed bucket of 10 rows
    # the replay times the server logs at load: every graph timed, no sequence's cache touched (slots 0-3)
    before = [c[:4].clone() for c in dec.k_cache + dec.v_cache]
    graphs.graphs[(4, 16, False)] = graphs.capture(4, 16)
    times = graphs.replay_ms(repeats=3)
    assert set(times) == {(12, 32, True), (4, 16, False)} and all(t > 0 for t in times.values())
    assert all(torch.equal(c[:4], b) for c, b in zip(dec.k_cache + dec.v_cache, before))
    # compiled per layer (compile_layers: inductor's Triton kernels here), then captured: the eager logits
    tokens, slots, positions = tokens[:3], torch.arange(3, device="cuda"), torch.full((3,), 9, device="cuda")
    eager = dec.decode(tokens, slots, positions, 10).clone()
    dec.compile_layers()
    torch.testing.assert_close(Graphs(dec, length_bucket=16)(tokens, slots, positions, 10), eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_the_paged_kernel_through_cuda_graphs_equals_the_gather(llama):
    """bf16 on the GPU: decoding rows over a shuffled block table through the Triton kernel (paged_kernel.py, the
    default on a GPU), eager and replayed as CUDA graphs (decode-only and mixed steps), against the gather; also
    inside a whole step compiled by inductor (compile: inductor)."""
    from builder.generation.decoder import Graphs

    _, config, weights = _on_cuda(llama)
    dec = Decoder(config, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()})
    dec.allocate_paged(4, 200, 4 * 13 + 3, 16)
    assert dec.kernel is not None  # on by default on a GPU
    dec.kernel = None
    dec.set_tables([0, 1, 2, 3], torch.randperm(4 * 13 + 3)[:4 * 13].view(4, 13).tolist())
    for slot in range(4):
        dec(torch.randint(3, 200, (41 + 30 * slot,), device="cuda"), [(slot, 0, 41 + 30 * slot)])
    tokens, slots = torch.randint(3, 200, (4,), device="cuda"), torch.arange(4, device="cuda")
    positions = torch.tensor([41, 71, 101, 131], device="cuda")
    mixed = (torch.randint(3, 200, (9,), device="cuda"), torch.tensor([1, 2] + [0] * 7, device="cuda"),
             torch.tensor([71, 101] + list(range(41, 48)), device="cuda"), 160, torch.tensor([2], device="cuda"),
             torch.tensor([0, 1, 8], device="cuda"))
    gathered = [dec.decode(tokens, slots, positions, 160).clone(), dec.decode(*mixed).clone()]
    dec.use_paged_kernel()
    paged = [dec.decode(tokens, slots, positions, 160).clone(), dec.decode(*mixed).clone()]
    graphs = Graphs(dec, length_bucket=64, max_rows=4 + 8)
    replayed = [graphs(tokens, slots, positions, 160).clone(), graphs(*mixed).clone()]
    graphs = Graphs(dec, torch.compile(dec.decode, dynamic=True), length_bucket=64, max_rows=4 + 8)
    compiled = [graphs(tokens, slots, positions, 160).clone(), graphs(*mixed).clone()]
    for a, b, c, d in zip(paged, gathered, replayed, compiled):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)  # bf16: two kernels' rounding
        torch.testing.assert_close(c, a, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(d, a, rtol=0.02, atol=0.02)  # inductor's own rounding of the layers
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_graph_buckets_above_compiled_rows_capture_the_plain_step(llama):
    """int8 weights: only the 1-row bucket captures the inductor-compiled step (COMPILED_ROWS: inductor's fused
    int8 kernel scales with the rows); bigger buckets, prompt chunks included, capture the plain decode."""
    from builder.generation.decoder import COMPILED_ROWS, UNCOMPILED_MIXED, Graphs

    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    dec = Decoder(config, weights)
    dec.allocate(4, 64)

    def compiled(*args):
        return dec.decode(*args)

    graphs = Graphs(dec, compiled, max_rows=4 + 16, compiled_rows=COMPILED_ROWS["int8"])
    buckets = graphs.decode_batches + graphs.batches  # decode-only [1, 2, 4], mixed [8, 16, 20]
    assert [graphs.step_for(b) == compiled for b in buckets] == [True] + [False] * 5
    unlimited = Graphs(dec, compiled, max_rows=4 + 16, compiled_rows=COMPILED_ROWS.get("none"))
    assert all(unlimited.step_for(b) == compiled for b in buckets)
    int4 = Graphs(dec, compiled, max_rows=4 + 16, compile_mixed="int4" not in UNCOMPILED_MIXED)
    assert [int4.step_for(b, mixed) == compiled for b, _, mixed in int4.keys()] == [not m for _, _, m in int4.keys()]


@pytest.mark.slow
def test_inductor_compiled_decode_step_equals_eager(llama):
    """compile: inductor compiles decode() with dynamic shapes (what the GPU graphs then capture); on the CPU
    here the same tracing runs, so a graph break or a wrong result shows up before any GPU run (~1 min)."""
    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    dec = Decoder(config, weights)
    dec.allocate(4, 64)
    for slot in range(4):
        dec(torch.randint(3, 200, (9,)), [(slot, 0, 9)])
    compiled = torch.compile(dec.decode, dynamic=True, fullgraph=True)
    for rows, length in [(2, 16), (4, 32)]:
        tokens, slots, positions = torch.randint(3, 200, (rows,)), torch.arange(rows), torch.full((rows,), 9)
        eager = dec.decode(tokens, slots, positions, length)
        torch.testing.assert_close(compiled(tokens, slots, positions, length), eager, rtol=1e-4, atol=1e-4)
    # mixed steps (prompt rows after decoding ones), below and above the slots: the rows past them never decode
    for rows, decoding in [(4, 2), (8, 1)]:
        tokens = torch.randint(3, 200, (rows,))
        slots = torch.tensor(list(range(decoding)) + [3] * (rows - decoding))
        positions = torch.tensor([9] * decoding + list(range(9, 9 + rows - decoding)))
        args = (tokens, slots, positions, 32, torch.tensor([decoding]), torch.tensor(list(range(decoding)) + [rows - 1]))
        eager = dec.decode(*args)
        torch.testing.assert_close(compiled(*args), eager, rtol=1e-4, atol=1e-4)


def _fill(dec):
    for slot in range(4):
        dec(torch.randint(3, 200, (9,)), [(slot, 0, 9)])


def _decode_steps(dec):
    """Decode-only steps of 2 and 4 rows and a mixed one (prompt rows after decoding ones), on filled slots."""
    out = []
    for rows in (2, 4):
        out.append(dec.decode(torch.randint(3, 200, (rows,)), torch.arange(rows), torch.full((rows,), 9), 16))
    tokens, slots = torch.randint(3, 200, (6,)), torch.tensor([0, 1, 3, 3, 3, 3])
    positions = torch.tensor([9, 9, 9, 10, 11, 12])
    out.append(dec.decode(tokens, slots, positions, 16, torch.tensor([2]), torch.tensor([0, 1, 5])))
    return out


def test_layers_compile_once_for_every_layer_and_step_size(llama):
    """compile_layers: the elementwise functions (four over the slot cache here) are traced once each (weights are
    arguments, so no layer recompiles) for every step size with two rows or more, decode-only and mixed. Counted
    with a backend that records what dynamo hands it."""
    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    dec = Decoder(config, weights)
    dec.allocate(4, 64)
    _fill(dec)  # the ragged forward runs under inference_mode: its calls would be traced apart (dispatch keys)
    traced = []
    dec.compile_layers(backend=lambda gm, _: traced.append(gm) or gm.forward)
    _decode_steps(dec)
    assert config.num_layers > 1 and len(traced) == 4


def _same_logits(config, weights, allocate, change) -> None:
    """_decode_steps' logits of a decoder as `allocate` makes it, and of one changed by `change` after its slots
    are filled: equal."""
    runs = []
    for changed in (False, True):
        torch.manual_seed(0)
        dec = Decoder(config, weights)
        allocate(dec)
        _fill(dec)
        if changed:
            change(dec)
        runs.append(_decode_steps(dec))
    for plain, other in zip(*runs):
        torch.testing.assert_close(other, plain, rtol=1e-4, atol=1e-4)


def test_layers_traced_over_a_paged_cache_write_it_as_eager_does(llama):
    """compile_layers over a paged cache, traced by dynamo and run as traced (backend "eager", seconds): the rotary
    function's writes into the pool (split_heads_into) land, so later steps read them and the logits equal the
    untraced decoder's. Inductor's own kernels for it: the slow test below."""
    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    _same_logits(config, weights, lambda dec: dec.allocate_paged(4, 64, 40, 8),
                 lambda dec: dec.compile_layers(backend="eager"))


@pytest.mark.slow
@pytest.mark.parametrize("arch,cache", [("llama", "slots"), ("qwen3", "slots"), ("llama", "paged")])
def test_layers_compiled_by_inductor_equal_eager(arch, cache, tmp_path):
    """compile_layers with inductor (the CPU's C++ kernels here, Triton's on the GPU): the same logits as the eager
    decoder for decode-only and mixed steps, with and without per-head q/k norms, and over a paged cache (whose
    writes the rotary function makes, in place) (~1 min)."""
    tok, model = _loaded(make_model_dir(tmp_path, arch))
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    allocate = (lambda dec: dec.allocate(4, 64)) if cache == "slots" else (lambda dec: dec.allocate_paged(4, 64, 40, 8))
    _same_logits(config, weights, allocate, Decoder.compile_layers)


@pytest.mark.parametrize("block_size", [4, 16])
def test_the_paged_kernel_reads_the_paged_blocks_as_the_gather_does(llama, block_size):
    """use_paged_kernel: decoding rows attend through paged_kernel.py (Triton's interpreter here) and give the
    gather's logits, decode-only and mixed steps, on block tables out of order with partly filled last blocks."""
    pytest.importorskip("triton")
    tok, model = llama
    config, weights = hf2decoder.convert(model, (tok.eos_token_id,))
    width = -(-64 // block_size)

    def paged(dec):
        dec.allocate_paged(4, 64, 4 * width + 5, block_size)
        dec.set_tables(list(range(4)), torch.randperm(4 * width + 5)[:4 * width].view(4, width).tolist())

    _same_logits(config, weights, paged, Decoder.use_paged_kernel)


def test_two_identical_requests_are_two_requests(llama):
    """Requests compare by identity: two with the same prompt, options and callbacks are two (value equality made
    `in` / running.remove / waiting.remove take whichever equal one came first), and both run to their end."""
    tok, model = llama
    engine = _engine(tok, model, slots=2, total=200)
    ids = tok(PROMPTS[0])["input_ids"]
    finals: list[eng.Output] = []
    never = lambda: False  # noqa: E731 - one callback shared by both
    same = dict(emit=lambda o: finals.append(o) if o.finished else None, ignore_eos=True, cancelled=never)
    first, second = eng.Request(ids, 20, **same), eng.Request(ids, 20, **same)
    assert first != second and len({first, second}) == 2
    engine.submit(first)
    engine.submit(second)
    engine.step()
    engine.waiting.append(first)  # a stale duplicate entry must not stand for the other request
    assert second not in engine.waiting
    engine.waiting.remove(first)
    while len(finals) < 2:
        engine.step()
    assert [f.num_output_tokens for f in finals] == [20, 20] and finals[0].token_ids == finals[1].token_ids
    assert sorted(engine.free) == [0, 1] and not engine.running


def test_logprobs_of_the_picked_tokens_and_the_most_likely(llama):
    """logprobs=k: every generated token comes with its log-probability and the k most likely tokens' (the
    picked one first when greedy), in the outputs that carry it, streamed or not; other requests get none."""
    tok, model = llama
    engine = _engine(tok, model, slots=3, total=200)
    ids = tok(PROMPTS[1])["input_ids"]
    [plain] = eng.generate(engine, [ids], 12, ignore_eos=True)
    for stream in (False, True):
        outs: list[eng.Output] = []
        engine.submit(eng.Request(ids, 12, emit=outs.append, stream=stream, ignore_eos=True, logprobs=3))
        while not (outs and outs[-1].finished):
            engine.step()
        tokens = [t for o in outs for t in (o.tokens or [])]
        assert [t[0] for t in tokens] == outs[-1].token_ids == plain.token_ids
        for token, logprob, top in tokens:
            assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - logprob) < 1e-5
            assert logprob <= 0 and top[0][1] >= top[1][1] >= top[2][1]
    assert plain.tokens is None
    # the values are the model's: a fresh forward over prompt + output gives the same log-softmax
    with torch.no_grad():
        full = torch.tensor([ids + plain.token_ids[:-1]])
        ref = torch.log_softmax(model(full).logits[0, len(ids) - 1:].float(), -1)
    want = ref.gather(-1, torch.tensor(plain.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([t[1] for t in tokens]), want, atol=1e-3)


class _OnlyTokens:
    """A guide that allows a fixed set of tokens (what a grammar's mask does, without the grammar)."""

    def __init__(self, allowed: list[int]):
        self.allowed, self.accepted = allowed, []

    def mask(self, row: torch.Tensor) -> None:
        keep = torch.full_like(row, float("-inf"))
        keep[self.allowed] = 0
        row += keep

    def accept(self, token: int) -> None:
        self.accepted.append(token)


def test_a_guide_masks_each_step_and_sees_every_token(llama):
    tok, model = llama
    engine = _engine(tok, model, slots=2, total=200)
    ids = tok(PROMPTS[0])["input_ids"]
    guide = _OnlyTokens([5, 17, 42])
    outs: list[eng.Output] = []
    engine.submit(eng.Request(ids, 10, emit=outs.append, ignore_eos=True, guide=guide, temperature=1.0, seed=3))
    [other] = eng.generate(engine, [ids], 10, ignore_eos=True)  # unguided at the same time: unchanged
    while not (outs and outs[-1].finished):
        engine.step()
    assert set(outs[-1].token_ids) <= {5, 17, 42} and guide.accepted == outs[-1].token_ids
    [alone] = eng.generate(engine, [ids], 10, ignore_eos=True)
    assert other.token_ids == alone.token_ids
