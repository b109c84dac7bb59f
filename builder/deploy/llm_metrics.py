"""The Prometheus metrics of an LLM endpoint that the LLM dashboard, recording rules and alerts read: the
names in one place, so the processes that export them and `deploy` agree.

vLLM's names and types (`vllm:time_to_first_token_seconds`, `vllm:num_requests_waiting`, ...) with the
prefix `triton_builder_` (no colon: Triton's custom metric names may not have one); every series carries
the label `model` (the served model), the label Triton's own per-model metrics use.

Who exports what:
- the OpenAI front (builder/openai/metrics.py), on its /metrics at the OpenAI port (`serve --openai-port`;
  the deploy scrapes PORT by default): TTFT, ITL, E2E, PROMPT_TOKENS, GENERATION_TOKENS and REQUESTS,
  measured per request;
- the served engine (templates/python/generator.py, METRICS) as Triton custom metrics on Triton's /metrics
  (port 8002): QUEUE, PREFIX_QUERIES, PREFIX_HITS (paged KV cache only), RUNNING, WAITING and KV_USAGE. The
  front copies these lines into its own /metrics, so scraping the front alone gives every name (scraping both
  gives the engine's series twice, under two instances). The compose file `deploy` writes runs Triton alone,
  without the front: there only the engine's come, from Triton's port.
generator.py is copied into the model repository and cannot import this module: it spells its names out,
and tests/test_deploy_llm.py checks they are these.
"""

from __future__ import annotations

PREFIX = "triton_builder_"
LABEL = "model"
PORT = 9000  # the OpenAI front's port as the docs run it (`serve --openai-port 9000`, no default): the deploy's
# default scrape target for these (--llm-metrics-target overrides)

# histograms (seconds): <name>_bucket{le=...}, <name>_sum, <name>_count
TTFT = PREFIX + "time_to_first_token_seconds"  # request arrival to the first generated token
ITL = PREFIX + "inter_token_latency_seconds"  # gap between two generated tokens of one request
QUEUE = PREFIX + "request_queue_time_seconds"  # arrival in the engine to its admission (waiting for a slot)
E2E = PREFIX + "e2e_request_latency_seconds"  # arrival to the last token
# counters
PROMPT_TOKENS = PREFIX + "prompt_tokens_total"
GENERATION_TOKENS = PREFIX + "generation_tokens_total"
REQUESTS = PREFIX + "request_success_total"  # finished sequences, label finished_reason (stop, length, ...)
PREFIX_QUERIES = PREFIX + "prefix_cache_queries_total"  # prompt tokens looked up in the prefix cache
PREFIX_HITS = PREFIX + "prefix_cache_hits_total"  # of those, tokens found cached
# gauges
RUNNING = PREFIX + "num_requests_running"  # sequences in the running batch
WAITING = PREFIX + "num_requests_waiting"  # requests queued for a slot
KV_USAGE = PREFIX + "kv_cache_usage_perc"  # fraction of KV-cache blocks in use, 0 to 1

HISTOGRAMS = (TTFT, ITL, QUEUE, E2E)
COUNTERS = (PROMPT_TOKENS, GENERATION_TOKENS, REQUESTS, PREFIX_QUERIES, PREFIX_HITS)
GAUGES = (RUNNING, WAITING, KV_USAGE)
ALL = HISTOGRAMS + COUNTERS + GAUGES
ENGINE = (QUEUE, PREFIX_QUERIES, PREFIX_HITS, RUNNING, WAITING, KV_USAGE)  # on Triton's /metrics (generator.py)
FRONT = (TTFT, ITL, E2E, PROMPT_TOKENS, GENERATION_TOKENS, REQUESTS)  # measured by the OpenAI front

# recording rules over them (prometheus/llm_rules.yml), which the LLM dashboard and alerts read
RULES = {
    "ttft_p50": "model:triton_builder_ttft_seconds:p50",
    "ttft_p95": "model:triton_builder_ttft_seconds:p95",
    "itl_p50": "model:triton_builder_itl_seconds:p50",
    "itl_p95": "model:triton_builder_itl_seconds:p95",
    "queue_p95": "model:triton_builder_queue_seconds:p95",
    "queue_avg": "model:triton_builder_queue_seconds:avg",
    "generation_tps": "model:triton_builder_generation_tokens:rate",
    "prompt_tps": "model:triton_builder_prompt_tokens:rate",
    "requests": "model:triton_builder_requests:rate",
    "running": "model:triton_builder_running:sum",
    "waiting": "model:triton_builder_waiting:sum",
    "kv_usage": "model:triton_builder_kv_cache_usage:max",
    "prefix_hit_ratio": "model:triton_builder_prefix_cache_hit_ratio:rate",
}
