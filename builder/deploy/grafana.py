"""The Grafana dashboard, as data: per-model throughput, latency per request split into queue / compute
input / infer / output, failures, pending requests, GPU utilization and memory. Panels read the
recording rules of prometheus/rules.yml (names below), so the dashboard and the alerts agree."""

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
