"""Every metric the OpenAI front exposes on its /metrics (Prometheus text).

The LLM metrics take builder/deploy/llm_metrics.py's names (the ones the deploy's dashboard and rules read).
The front's own figures are measured per request here; the engine's (queue time, prefix-cache lookups,
running and waiting sequences, the KV cache's use) are Triton custom metrics that the served model publishes
(templates/python/generator.py, METRICS), so Triton's own /metrics has them: the front copies those lines
from it.
"""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from builder.deploy import llm_metrics as llm

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

PREFIX = "triton_builder_openai_"  # the front's own, outside the LLM metrics
REQUESTS = PREFIX + "requests"  # counter (exposed as _total), labels route, status
RUNNING = PREFIX + "requests_running"  # gauge: generating, first token received
WAITING = PREFIX + "requests_waiting"  # gauge: sent to Triton, no token yet
# the LLM metrics it measures (label llm.LABEL; counters are exposed with their _total)
TIME_TO_FIRST_TOKEN = llm.TTFT  # histogram
INTER_TOKEN_LATENCY = llm.ITL  # histogram
E2E_LATENCY = llm.E2E  # histogram
PROMPT_TOKENS = llm.PROMPT_TOKENS  # counter
GENERATION_TOKENS = llm.GENERATION_TOKENS  # counter
FINISHED = llm.REQUESTS  # counter, also label finished_reason
# the engine's, copied from Triton's /metrics (with a histogram's _bucket, _sum and _count lines)
ENGINE = llm.ENGINE

TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(REQUESTS, "HTTP requests by route and status code", ["route", "status"], registry=r)
        model = [llm.LABEL]
        self.ttft = Histogram(TIME_TO_FIRST_TOKEN, "Time from the request to its first token", model,
                              buckets=TIME_BUCKETS, registry=r)
        self.itl = Histogram(INTER_TOKEN_LATENCY, "Time between two generated tokens (a response of several "
                             "tokens counts each at its share)", model, buckets=TIME_BUCKETS, registry=r)
        self.e2e = Histogram(E2E_LATENCY, "Time from the request to its last token", model,
                             buckets=TIME_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens processed", model, registry=r)
        self.generation_tokens = Counter(GENERATION_TOKENS, "Tokens generated", model, registry=r)
        self.finished = Counter(FINISHED, "Sequences (choices) finished, by finish reason (abort: the client left "
                                "or generation failed)", model + ["finished_reason"], registry=r)
        self.running = Gauge(RUNNING, "Requests generating (first token received)", model, registry=r)
        self.waiting = Gauge(WAITING, "Requests sent to the model that have no token yet", model, registry=r)

    def text(self, triton_metrics_url: str | None) -> bytes:
        """The front's metrics, then the engine's lines of Triton's /metrics (if it answers)."""
        out = generate_latest(self.registry)
        if triton_metrics_url:
            try:
                with urllib.request.urlopen(f"http://{triton_metrics_url}/metrics", timeout=2) as answer:
                    lines = answer.read().decode().splitlines()
            except OSError:
                lines = []
            engine = [line for line in lines if any(name in line for name in ENGINE)]
            out += ("\n".join(engine) + "\n").encode() if engine else b""
        return out
