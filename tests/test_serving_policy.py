"""Admission control (queue_policy) and instances over several GPUs: spec errors and the rendered
config, parsed with Triton's own schema (tritonclient's ModelConfig)."""

import pytest

from builder.errors import UserError
from builder.render import PYTHON_BACKEND, model_config
from builder.signature import Signature, TensorSpec
from builder.spec import load_spec

MODEL = """
  - name: enc
    task: feature-extraction
    source: {config: {model_type: bert}}
    variants: [{format: onnx, precision: fp32}]
"""

SIG = Signature(inputs=(TensorSpec("input_ids", "int64", (-1,)),), outputs=(TensorSpec("emb", "float32", (4,)),),
                max_batch_size=8)

# (spec text before `models:`, extra lines of the model, the exact message after "<file>: ")
BAD = {
    "gpus_on_cpu": ("defaults: {instances: {kind: cpu, gpus: [0, 1]}}\n", "",
                    "defaults.instances: gpus applies to kind: gpu only; set kind: gpu or remove gpus"),
    "gpus_twice": ("defaults: {instances: {kind: gpu, gpus: [0, 0]}}\n", "",
                   "defaults.instances: gpus [0, 0] must be distinct device indices >= 0 (e.g. [0, 1]), or all"),
    "gpus_word": ("defaults: {instances: {kind: gpu, gpus: some}}\n", "",
                  "defaults.instances.gpus: 'some' is not a list of GPU indices; use e.g. [0, 1], or all"),
    "queue_negative": ("defaults: {queue_policy: {max_queue_size: -1}}\n", "",
                       "defaults.queue_policy.max_queue_size: Input should be greater than or equal to 0; got -1; write 0 or more"),
    "timeout_action": ("defaults: {queue_policy: {timeout_action: drop}}\n", "",
                       "defaults.queue_policy.timeout_action: 'drop' is not allowed; use one of 'reject' or 'delay'"),
    "priority_without_levels": ("defaults: {queue_policy: {default_priority: 2}}\n", "",
                                "defaults.queue_policy: default_priority and levels need priority_levels >= 1"),
    "priority_above": ("defaults: {queue_policy: {priority_levels: 2, default_priority: 3}}\n", "",
                       "defaults.queue_policy: default_priority 3 is above priority_levels 2"),
    "level_outside": ("defaults: {queue_policy: {priority_levels: 2, levels: {3: {max_queue_size: 4}}}}\n", "",
                      "defaults.queue_policy: levels [3] are outside 1..2 (priority_levels)"),
    "queue_without_batcher": ("", "    max_batch_size: 0\n    queue_policy: {max_queue_size: 4}\n",
                              "models[enc].queue_policy: the queue belongs to the dynamic batcher; set max_batch_size > 0 "
                              "and dynamic_batching, or remove queue_policy"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_serving_settings_are_one_line_errors(case, tmp_path):
    head, extra, expected = BAD[case]
    path = tmp_path / "spec.yaml"
    path.write_text(head + "models:" + MODEL + extra)
    with pytest.raises(UserError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: {expected}"


def _rendered(tmp_path, text: str):
    from builder.render import parse_config

    path = tmp_path / "spec.yaml"
    path.write_text(text)
    spec = load_spec(path)
    model = spec.models[0]
    return parse_config(model_config("enc", SIG, backend=PYTHON_BACKEND, serving=spec.serving(model),
                                     parameters={}, warmup=[]))


def test_queue_policy_renders_into_the_dynamic_batcher(tmp_path):
    config = _rendered(tmp_path, "defaults:\n  queue_policy: {max_queue_size: 16, timeout_us: 50000, "
                                 "allow_timeout_override: true}\nmodels:" + MODEL)
    policy = config.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds, policy.allow_timeout_override) == (16, 50000, True)
    assert policy.timeout_action == policy.REJECT
    assert config.dynamic_batching.priority_levels == 0


def test_priority_levels_and_per_level_queues(tmp_path):
    config = _rendered(tmp_path, "models:" + MODEL + "    queue_policy:\n      {max_queue_size: 8, timeout_us: 1000, "
                       "priority_levels: 2, levels: {1: {max_queue_size: 64, timeout_action: delay}}}\n")
    db = config.dynamic_batching
    assert (db.priority_levels, db.default_priority_level) == (2, 2)  # unnamed requests wait in the lower level
    assert db.default_queue_policy.max_queue_size == 8
    high = db.priority_queue_policy[1]
    assert (high.max_queue_size, high.timeout_action, high.default_timeout_microseconds) == (64, high.DELAY, 0)
    assert 2 not in db.priority_queue_policy


def test_no_queue_policy_leaves_the_queue_unbounded(tmp_path):
    config = _rendered(tmp_path, "models:" + MODEL)
    assert not config.dynamic_batching.HasField("default_queue_policy")


@pytest.mark.parametrize("gpus, expected", [("[0, 1]", [0, 1]), ("all", []), ("[3]", [3])])
def test_instances_over_several_gpus(tmp_path, gpus, expected):
    config = _rendered(tmp_path, f"defaults: {{instances: {{kind: gpu, count: 2, gpus: {gpus}}}}}\nmodels:" + MODEL)
    (group,) = config.instance_group
    assert group.kind == group.KIND_GPU and group.count == 2  # `count` instances on each GPU
    assert list(group.gpus) == expected  # none listed: Triton puts them on every visible GPU


def test_cpu_copy_of_gpu_settings_renders_no_gpus(tmp_path):
    """Ensembles run their pre/post-processing on CPU with a copy of the model's instances (kind: cpu)."""
    path = tmp_path / "spec.yaml"
    path.write_text("defaults: {instances: {kind: gpu, gpus: [0, 1]}}\nmodels:" + MODEL)
    spec = load_spec(path)
    serving = spec.serving(spec.models[0])
    cpu = {**serving, "instances": serving["instances"].model_copy(update={"kind": "cpu"})}
    from builder.render import parse_config

    (group,) = parse_config(model_config("pre", SIG, backend=PYTHON_BACKEND, serving=cpu, parameters={},
                                         warmup=[])).instance_group
    assert group.kind == group.KIND_CPU and list(group.gpus) == []


def test_gpu_scaling_bench_spec_puts_the_same_variant_on_one_and_two_gpus():
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parent.parent / "perf" / "gpu" / "scaling.yaml")
    placed = {m.name: spec.serving(m)["instances"] for m in spec.models}
    assert {n: (i.kind, i.count, i.gpus) for n, i in placed.items()} == {"bert_1gpu": ("gpu", 4, [0]),
                                                                         "bert_2gpu": ("gpu", 4, [0, 1])}
    assert spec.models[0].variants == spec.models[1].variants
