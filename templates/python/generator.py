"""Triton python-backend model: text in, text out, from a KV cache with continuous batching (decoupled).

Copied unchanged into `<model>/1/model.py` beside `decoder.py`, `engine.py`, `decoder.json`,
`weights.safetensors` and `tokenizer.json`; settings come from the config's `parameters`. It needs torch
and `tokenizers` only. The tensor names are those of Triton's TensorRT-LLM and vLLM backends, so the same
clients and load generators work on all three:

  inputs   text_input (BYTES), optional max_tokens (INT32), stream (BOOL), temperature, top_p (FP32),
           top_k (INT32), seed (UINT64), stop (BYTES, any number of strings), ignore_eos (BOOL),
           add_special_tokens (BOOL: default true, as a tokenizer does; false for text with them already)
  outputs  text_output (BYTES: generated text only), finish_reason (BYTES: "stop" | "length"),
           num_input_tokens, num_output_tokens (INT32), token_info (BYTES, JSON: only with the `logprobs`
           parameter: [[id, logprob, [[id, logprob] of the most likely]], ...] of the response's new tokens)
  request parameters (optional; Triton's generate route takes them as JSON fields, gRPC as parameters):
           logprobs (int: 0 each token's log-probability, k also the k most likely), prompt_ids (a JSON list
           of token ids, used instead of tokenizing text_input), guide (JSON: {"json_schema": ...} or
           {"json_object": true}: decoding limited to text the grammar accepts, through xgrammar)

`execute` checks each request, hands it to the engine thread and returns; the engine makes the responses
and a sending thread sends them, in order, while the engine runs its next step: the first token at once and
then new text every `stream_interval` tokens when `stream` is true (the generation.stream_interval of the
spec; 0: 1 token per response up to 8 running sequences, then fewer responses per step), else one response
with the whole text; the last one carries the FINAL flag. A cancelled request (client gone, or cancelled)
frees its cache slot at the engine's next cancellation poll and gets a final CANCELLED response then (Triton
releases a request only once a FINAL response went out). The engine's load (running and waiting sequences,
the KV cache's use), its requests' queue times and its prefix-cache lookups are published as Triton custom
metrics (METRICS) a few times a second.
"""

import gc
import json
import os
import queue
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import decoder as decoder_module  # noqa: E402 - beside this file in the repository
import engine as engine_module  # noqa: E402

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16"}
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# optional one-value inputs (besides text_input and stop)
SCALARS = ("max_tokens", "stream", "temperature", "top_p", "top_k", "seed", "ignore_eos", "add_special_tokens")
MAX_LOGPROBS = 20
# Triton custom metrics (its /metrics, label `model`), published every METRICS_EVERY_S: key -> (name, kind,
# description). The names are builder/deploy/llm_metrics.py's, spelled out because this file is served without
# the builder (tests/test_deploy_llm.py checks they match).
METRICS = {
    "running": ("triton_builder_num_requests_running", "GAUGE", "Sequences in the engine's running batch"),
    "waiting": ("triton_builder_num_requests_waiting", "GAUGE", "Requests waiting for a place in the running batch"),
    "cache": ("triton_builder_kv_cache_usage_perc", "GAUGE", "Share of the KV cache's tokens in use (0..1)"),
    "queue": ("triton_builder_request_queue_time_seconds", "HISTOGRAM",
              "Time from a request's arrival in the engine to its admission to the running batch"),
    # paged KV cache only: cumulative prompt tokens
    "queries": ("triton_builder_prefix_cache_queries_total", "COUNTER", "Prompt tokens looked up in the prefix cache"),
    "hits": ("triton_builder_prefix_cache_hits_total", "COUNTER", "Prompt tokens found in the prefix cache"),
}
QUEUE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]
METRICS_EVERY_S = 0.25


class RequestError(ValueError):
    """A request outside the model's limits: answered with INVALID_ARG naming the input and the limit."""


def _params(config):
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def _scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy()
    if value.size != 1:
        raise RequestError(f"{name}: give one value (got shape {list(value.shape)})")
    return value.reshape(-1)[0].item()


def _texts(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return []
    out = []
    for item in tensor.as_numpy().reshape(-1):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"{name}: not valid UTF-8 text") from None
        out.append(str(item))
    return out


class TritonPythonModel:
    def initialize(self, args):
        import torch
        from tokenizers import Tokenizer

        self.config = json.loads(args["model_config"])
        self.name = args.get("model_name", self.config.get("name", ""))
        p = _params(self.config)
        self.limits = {k: int(p[k]) for k in ("max_prompt_tokens", "max_total_tokens", "max_tokens")}
        threads = int(p.get("threads", "0"))
        if threads:
            torch.set_num_threads(threads)
        gpu = p.get("device") == "gpu" and torch.cuda.is_available()
        device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
        if gpu:
            torch.cuda.set_device(device)
        precision = p.get("precision", "fp32")
        quantization = precision if precision in ("int8", "int4") else "none"  # weight-only, through torchao
        model = decoder_module.load(HERE, device=device, dtype=getattr(torch, TORCH_DTYPES[precision]),
                                    quantization=quantization)
        self.tokenizer = Tokenizer.from_file(os.path.join(HERE, "tokenizer.json"))
        self.add_special = p.get("add_special_tokens", "1") == "1"
        block, tokens = int(p.get("block_size", "16")), int(p.get("cache_tokens", "0"))
        if not tokens and gpu:  # the paged cache: a share of the memory the weights left (the rest: steps, graphs)
            free, _ = torch.cuda.mem_get_info(device)
            tokens = model.cache_tokens(int(free * float(p.get("gpu_memory_fraction", "0.9"))), block)
        self.engine = engine_module.Engine(model, self.tokenizer, max_sequences=int(p["max_sequences"]),
                                           max_total_tokens=self.limits["max_total_tokens"],
                                           prefill_chunk=int(p["prefill_chunk"]),
                                           stream_interval=int(p.get("stream_interval", "0")),
                                           kv_cache=p.get("kv_cache", "paged"), block_size=block,
                                           cache_blocks=tokens // block,
                                           prefix_caching=p.get("prefix_caching", "1") == "1")
        if gpu and p.get("cuda_graphs", "0") == "1":
            self._graphs(torch, model, p.get("compile", "none"), quantization)
        if gpu:
            self.engine.warm()  # the sampling kernels load now, not on the first sampled request
        # what loading made (torch, inductor's code, the graphs) leaves the garbage collector's scans: a full
        # collection of it takes 60-300 ms (on the H100 one stopped every stream for 65 ms; runner.py's freeze_heap)
        gc.collect()
        gc.freeze()
        pb_utils.Logger.log_info(f"{self.name} ready: {gc.get_freeze_count()} objects left out of the garbage "
                                 "collector's scans")
        self.stop = threading.Event()
        self.outbox = queue.SimpleQueue()  # (sender, engine Output, gone) for the sending thread
        self.sending = threading.Thread(target=self._send_loop, name="generation-responses", daemon=True)
        self.sending.start()
        self.thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self.thread.start()
        self.metrics = threading.Thread(target=self._publish_load, name="generation-metrics", daemon=True)
        self.metrics.start()
        self.guides = None  # the grammar compiler, made on the first guided request

    def _publish_load(self):
        """The engine's load, queue times and prefix-cache lookups as Triton custom metrics. Each set, observe
        or increment is a round trip to Triton, so gauges are set on a change and counters by their growth."""
        blocks = self.engine.blocks
        keys = [k for k in METRICS if blocks is not None or k not in ("queries", "hits")]
        families = {k: pb_utils.MetricFamily(name=METRICS[k][0], description=METRICS[k][2],
                                             kind=getattr(pb_utils.MetricFamily, METRICS[k][1]))
                    for k in keys}  # kept: a family must outlive its metrics
        labels = {"model": self.name}
        metrics = {k: family.Metric(labels=labels, buckets=QUEUE_BUCKETS) if METRICS[k][1] == "HISTOGRAM"
                   else family.Metric(labels=labels) for k, family in families.items()}
        last, counted = None, (0, 0)
        while not self.stop.wait(METRICS_EVERY_S):
            now = self.engine.load()
            if now != last:
                for key, value in zip(("running", "waiting", "cache"), now):
                    metrics[key].set(float(value))
                last = now
            for seconds in self.engine.take_queue_times():
                metrics["queue"].observe(seconds)
            if blocks is not None:
                hits = blocks.hits  # read first: both only grow, so hits <= queries holds in what is published
                total = (blocks.queried, hits)
                for key, new, old in zip(("queries", "hits"), total, counted):
                    if new > old:
                        metrics[key].increment(float(new - old))
                counted = total

    def _graphs(self, torch, model, compile_mode, quantization):
        """Decode steps as CUDA graphs (optionally inductor-compiled first), captured now for every batch bucket
        at the first length bucket, so the first requests do not pay for it; longer ones are captured on use."""
        import time

        t0 = time.time()
        step = None
        if compile_mode == "inductor":
            # inductor fuses the elementwise work (norms, rotary, activation); its own CUDA graphs stay off
            step = torch.compile(model.decode, dynamic=True)  # the default mode: no CUDA graphs of its own
        # prompt chunks run through the graphs too (a row per prompt token): buckets up to slots + prefill_chunk
        compiled_rows = decoder_module.COMPILED_ROWS.get(quantization)
        # every bucket compiled: no 1-row bucket (a compilation of its own); int8 compiles only that one
        graphs = decoder_module.Graphs(model, step, max_rows=model.scratch + self.engine.prefill_chunk,
                                       compiled_rows=compiled_rows, min_rows=2 if step and not compiled_rows else 1,
                                       compile_mixed=quantization not in decoder_module.UNCOMPILED_MIXED)
        for key in graphs.keys():  # decode-only buckets up to the slots, mixed ones up to slots + prefill_chunk
            graphs.graphs[key] = graphs.capture(*key)
        self.engine.decode_step = graphs
        self.engine.graphed_prompts = True
        self.engine.overlap = True  # each step launched before the previous one is read
        limit = f", compiled up to {graphs.compiled_rows} row(s)" if step and graphs.compiled_rows else ""
        limit += ", mixed steps uncompiled" if step and not graphs.compile_mixed else ""
        pb_utils.Logger.log_info(f"captured {len(graphs.graphs)} decode graphs (compile: {compile_mode}{limit}) in "
                                 f"{time.time() - t0:.1f} s")
        replays = ", ".join(f"{'m' if mixed else 'b'}{rows}@{length} {ms:.3f}"
                            for (rows, length, mixed), ms in graphs.replay_ms().items())
        # m: a mixed bucket (decoding and prompt rows); read by perf/gpu/llm_bench.py
        pb_utils.Logger.log_info(f"decode graph replay of {self.name} (ms per step, rows@length): {replays}")

    def _run(self):
        try:
            self.engine.run(self.stop)
        except Exception as exc:  # noqa: BLE001 - log, and let waiting requests fail rather than hang
            pb_utils.Logger.log_error(f"generation engine stopped: {type(exc).__name__}: {exc}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = self._parse(request, sender)
            except RequestError as exc:
                sender.send(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)),
                    flags=FINAL)
                continue
            self.engine.submit(req)
        return None

    def _parse(self, request, sender):
        texts = _texts(request, "text_input")
        if len(texts) != 1:
            raise RequestError(f"text_input: give exactly one text (got {len(texts)})")
        extra = self._parameters(request)
        values = {name: _scalar(request, name) for name in SCALARS}
        if extra.get("prompt_ids") is not None:
            prompt = extra["prompt_ids"]
        else:
            if not texts[0].strip():
                raise RequestError("text_input: the text is empty")
            special = self.add_special if values["add_special_tokens"] is None else bool(values["add_special_tokens"])
            prompt = self.tokenizer.encode(texts[0], add_special_tokens=special).ids
        limit, total = self.limits["max_prompt_tokens"], self.limits["max_total_tokens"]
        if len(prompt) > limit:
            raise RequestError(f"text_input: the prompt has {len(prompt)} tokens; this model takes at most {limit} "
                               "(generation.max_prompt_tokens)")
        room = total - len(prompt)
        max_tokens = values["max_tokens"]
        if max_tokens is None:
            max_tokens = min(self.limits["max_tokens"], room)
        elif max_tokens < 1:
            raise RequestError(f"max_tokens: {max_tokens} is below 1")
        elif max_tokens > room:
            raise RequestError(f"max_tokens: {max_tokens} new tokens after a {len(prompt)}-token prompt exceed the "
                               f"cache of {total} tokens per sequence (generation.max_total_tokens); ask for at most {room}")
        temperature = values["temperature"] or 0.0
        top_p = 1.0 if values["top_p"] is None else values["top_p"]
        top_k = values["top_k"] or 0
        if temperature < 0:
            raise RequestError(f"temperature: {temperature} is below 0 (0 means greedy)")
        if not 0 < top_p <= 1:
            raise RequestError(f"top_p: {top_p} is outside (0, 1]")
        if top_k < 0:
            raise RequestError(f"top_k: {top_k} is below 0 (0 means no limit)")
        stop = tuple(s for s in _texts(request, "stop") if s)
        gone = threading.Event()  # set by the sending thread when the client is gone: the engine drops the request
        return engine_module.Request(
            prompt, int(max_tokens), emit=lambda out: self.outbox.put((sender, out, gone)),
            stream=bool(values["stream"]), temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
            seed=values["seed"], stop=stop, ignore_eos=bool(values["ignore_eos"]),
            cancelled=lambda: gone.is_set() or sender.is_cancelled(), logprobs=extra.get("logprobs", -1),
            guide=self._guide(extra["guide"]) if extra.get("guide") else None)

    def _parameters(self, request):
        """The request's parameters this model reads (logprobs, prompt_ids, guide), checked."""
        try:
            given = json.loads(request.parameters() or "{}")
        except (AttributeError, ValueError):
            given = {}
        out = {}
        logprobs = given.get("logprobs")
        if logprobs is not None:
            if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
                raise RequestError(f"logprobs: give a whole number from 0 to {MAX_LOGPROBS} (got {logprobs!r})")
            out["logprobs"] = logprobs
        ids = given.get("prompt_ids")
        if ids is not None:
            try:
                ids = json.loads(ids) if isinstance(ids, str) else ids
            except ValueError:
                ids = None
            vocab = self.engine.decoder.config.vocab_size
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
                raise RequestError(f"prompt_ids: give a non-empty JSON list of token ids below {vocab}")
            out["prompt_ids"] = ids
        guide = given.get("guide")
        if guide:
            try:
                out["guide"] = json.loads(guide) if isinstance(guide, str) else guide
            except ValueError as exc:
                raise RequestError(f"guide: not JSON ({exc})") from None
        return out

    def _guide(self, spec):
        """A grammar matcher for {"json_schema": schema} or {"json_object": true} (any JSON object)."""
        import guide as guide_module  # beside this file: needs xgrammar, loaded on the first guided request

        if self.guides is None:
            self.guides = guide_module.Compiler(self.tokenizer, self.engine.decoder.config.vocab_size,
                                                sorted(self.engine.eos))
        try:
            return self.guides.matcher(spec)
        except ValueError as exc:
            raise RequestError(f"guide: {exc}") from None

    def _send_loop(self):
        """Responses go out from this thread, in order: each send is a round trip to Triton (150-370 µs), and
        here it overlaps the engine's next step (whose wait for the GPU releases the GIL) instead of adding to it."""
        while True:
            item = self.outbox.get()
            if item is None:
                return
            sender, out, gone = item
            if gone.is_set() and not out.finished:  # the final one still goes: Triton waits for it
                continue
            try:
                self._send(sender, out)
            except Exception:  # noqa: BLE001 - a client that went away: the engine frees its slot at its next poll
                gone.set()

    @staticmethod
    def _send(sender, out):
        if out.finish_reason == "cancelled":
            code = getattr(pb_utils.TritonError, "CANCELLED", pb_utils.TritonError.UNKNOWN)
            response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError("cancelled", code))
        elif out.error is not None:
            response = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(out.error))
        else:
            tensors = [
                pb_utils.Tensor("text_output", np.array([out.text.encode("utf-8")], dtype=np.object_)),
                pb_utils.Tensor("finish_reason", np.array([out.finish_reason.encode()], dtype=np.object_)),
                pb_utils.Tensor("num_input_tokens", np.array([out.num_input_tokens], dtype=np.int32)),
                pb_utils.Tensor("num_output_tokens", np.array([out.num_output_tokens], dtype=np.int32)),
            ]
            if out.tokens is not None:
                tensors.append(pb_utils.Tensor("token_info", np.array([json.dumps(out.tokens).encode()], dtype=np.object_)))
            response = pb_utils.InferenceResponse(output_tensors=tensors)
        sender.send(response, flags=FINAL if out.finished else 0)

    def finalize(self):
        self.stop.set()
        self.thread.join(timeout=10)
        self.metrics.join(timeout=1)
        pb_utils.Logger.log_info(f"generation engine of {self.name}: {self.engine.summary()}")
        self.outbox.put(None)  # after the engine: what it emitted last still goes out
        self.sending.join(timeout=10)
