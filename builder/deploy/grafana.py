"""The Grafana dashboards, as data. `dashboard`: per-model throughput, latency per request split into
queue / compute input / infer / output, failures, pending requests, GPU utilization and memory, from the
recording rules of prometheus/rules.yml (names below). `llm_dashboard`: the LLM one, from
prometheus/llm_rules.yml. Panels read recording rules, so the dashboards and the alerts agree."""

from __future__ import annotations

# recording rule -> what it is; the rules template writes the same names
RULES = {
    "inferences": "model:nv_inference_count:rate",
    "requests": "model:nv_inference_request_success:rate",
    "failures": "model:nv_inference_request_failure:rate",
    "failure_ratio": "model:nv_inference_failure_ratio:rate",
    "request_us": "model:nv_inference_request_us_per_request:rate",
    "queue_us": "model:nv_inference_queue_us_per_request:rate",
    "input_us": "model:nv_inference_compute_input_us_per_request:rate",
    "infer_us": "model:nv_inference_compute_infer_us_per_request:rate",
    "output_us": "model:nv_inference_compute_output_us_per_request:rate",
    "pending": "model:nv_inference_pending_request_count:sum",
}
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}


def _panel(pid: int, title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, stack: bool = False) -> dict:
    return {
        "id": pid, "type": "timeseries", "title": title, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"stacking": {"mode": "normal" if stack else "none"},
                                                               "fillOpacity": 30 if stack else 0}},
                        "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                    "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(65 + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard(rate_window: str) -> dict:
    sel = '{model=~"$model"}'
    panels = [
        _panel(1, "Throughput: inferences/s and requests/s", [(RULES["inferences"] + sel, "{{model}} inferences"),
                                                            (RULES["requests"] + sel, "{{model}} requests")], "ops", 0, 0),
        _panel(2, "Latency per request: queue / compute input / infer / output",
               [(RULES[k] + sel, "{{model}} " + k.removesuffix("_us")) for k in ("queue_us", "input_us", "infer_us", "output_us")],
               "µs", 12, 0, stack=True),
        _panel(3, "Failed requests/s and failure ratio",
               [(RULES["failures"] + sel, "{{model}} failed/s"), (RULES["failure_ratio"] + sel, "{{model}} ratio")],
               "short", 0, 8),
        _panel(4, "Pending requests (queued + executing)", [(RULES["pending"] + sel, "{{model}}")], "short", 12, 8),
        _panel(5, "GPU utilization", [("nv_gpu_utilization", "GPU {{gpu_uuid}}")], "percentunit", 0, 16),
        _panel(6, "GPU memory used", [("nv_gpu_memory_used_bytes", "GPU {{gpu_uuid}}"),
                                      ("nv_gpu_memory_total_bytes", "GPU {{gpu_uuid}} total")], "bytes", 12, 16),
        _panel(7, "Time per request, end to end in the server", [(RULES["request_us"] + sel, "{{model}}")], "µs", 0, 24),
    ]
    return {
        "uid": "triton-builder", "title": "Triton (triton-builder)", "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "tags": ["triton"],
        "description": f"Recording rules use rate() over {rate_window}; see prometheus/rules.yml",
        "templating": {"list": [{
            "name": "model", "type": "query", "label": "model", "datasource": DATASOURCE,
            "query": {"query": "label_values(nv_inference_request_success, model)", "refId": "model"},
            "definition": "label_values(nv_inference_request_success, model)",
            "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2,
        }]},
        "panels": panels,
    }


def llm_dashboard(rate_window: str) -> dict:
    """The LLM dashboard: time to first token, inter-token latency, tokens/s, running and waiting
    sequences, KV-cache use, prefix-cache hits and queue time, from the recording rules of
    prometheus/llm_rules.yml over the metrics named in builder/deploy/llm_metrics.py."""
    from builder.deploy.llm_metrics import LABEL, RULES, RUNNING

    sel = f'{{{LABEL}=~"$model"}}'
    leg = "{{" + LABEL + "}}"
    panels = [
        _panel(1, "Time to first token (p50, p95)", [(RULES["ttft_p50"] + sel, leg + " p50"),
                                                    (RULES["ttft_p95"] + sel, leg + " p95")], "s", 0, 0),
        _panel(2, "Inter-token latency (p50, p95)", [(RULES["itl_p50"] + sel, leg + " p50"),
                                                    (RULES["itl_p95"] + sel, leg + " p95")], "s", 12, 0),
        _panel(3, "Tokens/s: generated and prompt", [(RULES["generation_tps"] + sel, leg + " generated"),
                                                     (RULES["prompt_tps"] + sel, leg + " prompt")], "short", 0, 8),
        _panel(4, "Sequences: running and waiting", [(RULES["running"] + sel, leg + " running"),
                                                     (RULES["waiting"] + sel, leg + " waiting")], "short", 12, 8,
               stack=True),
        _panel(5, "KV cache in use", [(RULES["kv_usage"] + sel, leg)], "percentunit", 0, 16),
        _panel(6, "Prefix-cache hit ratio (tokens)", [(RULES["prefix_hit_ratio"] + sel, leg)], "percentunit", 12, 16),
        _panel(7, "Queue time (average, p95)", [(RULES["queue_avg"] + sel, leg + " average"),
                                                (RULES["queue_p95"] + sel, leg + " p95")], "s", 0, 24),
        _panel(8, "Finished requests/s", [(RULES["requests"] + sel, leg)], "reqps", 12, 24),
    ]
    query = f"label_values({RUNNING}, {LABEL})"
    return {
        "uid": "triton-builder-llm", "title": "LLM serving (triton-builder)", "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "tags": ["triton", "llm"],
        "description": f"Recording rules use rate() over {rate_window}; see prometheus/llm_rules.yml",
        "templating": {"list": [{
            "name": "model", "type": "query", "label": "model", "datasource": DATASOURCE,
            "query": {"query": query, "refId": "model"}, "definition": query,
            "includeAll": True, "multi": True, "current": {"text": "All", "value": "$__all"}, "refresh": 2,
        }]},
        "panels": panels,
    }
