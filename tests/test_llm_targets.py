"""The TensorRT-LLM and vLLM targets, which cannot run here (no GPU, Docker, TensorRT-LLM or vLLM): every
rendered config parses with Triton's schema, model.json / model.yaml parse, the check functions accept
what render wrote and refuse broken copies with one line, the exact build commands and container spec
are asserted, and every lint case has its line. These prove what would be sent, not that it serves."""

import json
import shlex
from pathlib import Path
from unittest import mock

import pytest
import yaml

from builder.errors import UserError
from builder.render import parse_config
from builder.spec import Generation
from builder.targets import TARGETS, common, trtllm, vllm

GEN = Generation(max_sequences=64, max_prompt_tokens=2048, max_total_tokens=4096, max_tokens=256, prefill_chunk=512)
SERVING: dict = {}


def tokenizer_dir(path: Path, *, eos: bool = True, pad: bool = True, eos_ids=None) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", "<eot>", "hello", "world"])}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>", eos_token="</s>" if eos else None, pad_token="<pad>" if pad else None)
    fast.save_pretrained(str(path))
    if eos_ids is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return path


def weights_dir(path: Path, model_type: str = "llama") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def configs_parse(repo: Path) -> dict:
    return {p.parent.name: parse_config(p.read_text(), str(p)) for p in sorted(repo.glob("*/config.pbtxt"))}


# --- vLLM ---------------------------------------------------------------------------------------------

def test_vllm_renders_engine_args_and_a_config_triton_accepts(tmp_path):
    weights_dir(tmp_path / "llama_vllm_bf16" / "1" / "hf")
    entries = vllm.render(tmp_path, name="llama_vllm_bf16", weights="llama_vllm_bf16/1/hf", tokenizer=None,
                          precision="bf16", generation=GEN, serving=SERVING)
    cfg = configs_parse(tmp_path)["llama_vllm_bf16"]
    assert cfg.backend == "vllm" and cfg.max_batch_size == 0 and not cfg.HasField("model_transaction_policy")
    assert [g.kind for g in cfg.instance_group] == [3]  # KIND_MODEL
    args = json.loads((tmp_path / "llama_vllm_bf16" / "1" / "model.json").read_text())
    assert args == {"model": "/models/llama_vllm_bf16/1/hf", "dtype": "bfloat16", "max_model_len": 4096,
                    "max_num_seqs": 64, "max_num_batched_tokens": 512, "enable_chunked_prefill": True,
                    "gpu_memory_utilization": 0.9, "tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                    "enforce_eager": False}
    entry = entries["llama_vllm_bf16"]
    assert entry["files"] == ["1/hf/config.json", "1/model.json", "config.pbtxt"]
    assert entry["commands"]["serve"].endswith(
        f"-v {tmp_path.resolve()}:/models nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3 "
        "tritonserver --model-repository=/models")
    vllm.check(tmp_path / "llama_vllm_bf16", entry)


def test_vllm_hub_id_quantization_and_refusals(tmp_path):
    args = vllm.render(tmp_path, name="m", weights="meta-llama/Llama-3.2-1B-Instruct", tokenizer=None,
                       precision="int4", generation=GEN, serving=SERVING)["m"]["settings"]["engine_args"]
    assert args["model"] == "meta-llama/Llama-3.2-1B-Instruct" and args["quantization"] == "bitsandbytes"
    with pytest.raises(UserError, match="vLLM has no in-flight int8 weight-only quantization"):
        vllm.render(tmp_path, name="m", weights="a/b", tokenizer=None, precision="int8", generation=GEN, serving=SERVING)
    with pytest.raises(UserError, match=r"m \(format vllm\): 'no such dir' is neither a path inside the repository"):
        vllm.render(tmp_path, name="m", weights="no such dir", tokenizer=None, precision="bf16", generation=GEN,
                    serving=SERVING)
    (tmp_path / "m.gguf").write_text("")
    with pytest.raises(UserError, match="a GGUF model needs the original model's tokenizer directory"):
        vllm.render(tmp_path, name="m", weights="m.gguf", tokenizer=None, precision="bf16", generation=GEN, serving=SERVING)


@pytest.mark.parametrize("edit,message", [
    (("config.pbtxt", lambda t: t + "\nmodel_transaction_policy { decoupled: false }\n"),
     "m/config.pbtxt: decoupled is false, so streaming requests"),
    (("config.pbtxt", lambda t: t + "\nmax_batch_size: 8\n"), "m/config.pbtxt: max_batch_size is 8; the vLLM backend"),
    (("config.pbtxt", lambda t: t.replace("KIND_MODEL", "KIND_GPU")), "KIND_GPU is for single-GPU models"),
    (("config.pbtxt", lambda t: t.replace('backend: "vllm"', 'backend: "python"')), "backend is 'python', not 'vllm'"),
    (("1/model.json", lambda t: t[:-3]), "m/1/model.json: not valid JSON"),
    (("1/model.json", lambda t: t.replace('"max_num_seqs": 64', '"max_num_seqs": 65')),
     "m/1/model.json: max_num_seqs differ from the build recorded"),
])
def test_vllm_check_refuses_broken_files(tmp_path, edit, message):
    gen = GEN.model_copy(update={"tensor_parallel": 2})
    entry = vllm.render(tmp_path, name="m", weights="a/b", tokenizer=None, precision="bf16", generation=gen,
                        serving=SERVING)["m"]
    path = tmp_path / "m" / edit[0]
    path.write_text(edit[1](path.read_text()))
    with pytest.raises(UserError, match=message):
        vllm.check(tmp_path / "m", entry)


# --- TensorRT-LLM, flow llmapi ------------------------------------------------------------------------

def test_llmapi_model_yaml_and_config(tmp_path):
    entries = trtllm.render(tmp_path, name="llama_trt", weights="meta-llama/Llama-3.2-1B-Instruct", tokenizer=None,
                            precision="bf16", generation=GEN, serving=SERVING)
    cfg = configs_parse(tmp_path)["llama_trt"]
    assert cfg.backend == "python" and not cfg.HasField("model_transaction_policy")
    assert {"text_input", "streaming", "sampling_param_max_tokens", "sampling_param_stop"} <= {i.name for i in cfg.input}
    args = yaml.safe_load((tmp_path / "llama_trt" / "1" / "model.yaml").read_text())
    assert args == {"model": "meta-llama/Llama-3.2-1B-Instruct", "backend": "pytorch", "dtype": "bfloat16",
                    "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_batch_size": 64,
                    "max_input_len": 2048, "max_seq_len": 4096, "max_num_tokens": 512, "enable_chunked_prefill": True,
                    "kv_cache_config": {"free_gpu_memory_fraction": 0.9},
                    "triton_config": {"max_batch_size": 0, "decoupled": True}}
    entry = entries["llama_trt"]
    assert entry["settings"]["tensorrt_llm"] == "1.2.1"
    assert entry["commands"]["setup"] == (
        f"docker run --rm --gpus all --shm-size=2g -v {tmp_path.resolve()}:/models "
        "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 bash -c 'cp -r "
        "/app/all_models/llmapi/tensorrt_llm/1/model.py /app/all_models/llmapi/tensorrt_llm/1/helpers.py "
        "/models/llama_trt/1/'")
    with pytest.raises(UserError, match=r"llama_trt/1: model.py, helpers.py missing .*setup command"):
        trtllm.check(tmp_path / "llama_trt", entry)
    trtllm.check(tmp_path / "llama_trt", entry, runtime_files=False)
    for f in trtllm.LLMAPI_FILES:
        (tmp_path / "llama_trt" / "1" / f).write_text("# TensorRT-LLM's file, copied from the image\n")
    trtllm.check(tmp_path / "llama_trt", entry)


@pytest.mark.parametrize("change,message", [
    ({"triton_config": {"max_batch_size": 0, "decoupled": False}}, "decoupled is false, so streaming requests"),
    ({"triton_config": {"max_batch_size": 0}}, "triton_config needs decoupled and max_batch_size"),
    ({"max_input_len": 1024}, "the engine's max_input_len is 1024 but generation.max_prompt_tokens is 2048"),
    ({"max_seq_len": 2048}, "max_seq_len differ from the build recorded"),
])
def test_llmapi_check_refuses_broken_yaml(tmp_path, change, message):
    entry = trtllm.render(tmp_path, name="m", weights="a/b", tokenizer=None, precision="fp16", generation=GEN,
                          serving=SERVING)["m"]
    path = tmp_path / "m" / "1" / "model.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | change))
    with pytest.raises(UserError, match=message):
        trtllm.check(tmp_path / "m", entry, runtime_files=False)


def test_llmapi_refuses_in_flight_quantization_and_config_overrides(tmp_path):
    with pytest.raises(UserError, match="does not quantize on load; .* or set flow: engine for weight-only int8/int4"):
        trtllm.render(tmp_path, name="m", weights="a/b", tokenizer=None, precision="int4", generation=GEN,
                      serving=SERVING)
    entry = trtllm.render(tmp_path, name="m", weights="a/b", tokenizer=None, precision="bf16", generation=GEN,
                          serving=SERVING)["m"]
    (tmp_path / "m" / "config.pbtxt").write_text((tmp_path / "m" / "config.pbtxt").read_text() + "max_batch_size: 4\n")
    with pytest.raises(UserError, match="takes from model.yaml's triton_config; remove them from config.pbtxt"):
        trtllm.check(tmp_path / "m", entry, runtime_files=False)


# --- TensorRT-LLM, flow engine (legacy inflight_batcher_llm) -----------------------------------------

def render_engine(tmp_path, precision="bf16", generation=GEN, **tok):
    tokenizer_dir(tmp_path / "llama" / "tokenizer", **tok)
    weights_dir(tmp_path / "hf")
    return trtllm.render(tmp_path, name="llama", weights="hf", tokenizer="llama/tokenizer", precision=precision,
                         generation=generation, serving=SERVING, flow="engine")


def test_engine_flow_renders_the_whole_set_from_strict_templates(tmp_path):
    entries = render_engine(tmp_path)
    cfgs = configs_parse(tmp_path)
    assert sorted(cfgs) == ["llama", "postprocessing", "preprocessing", "tensorrt_llm", "tensorrt_llm_bls"]
    assert sorted(entries) == sorted(cfgs)
    for p in tmp_path.glob("*/config.pbtxt"):
        assert "${" not in p.read_text() and "{{" not in p.read_text()
    llm = cfgs["tensorrt_llm"]
    assert llm.backend == "tensorrtllm" and llm.model_transaction_policy.decoupled and llm.max_batch_size == 64
    assert {k: v.string_value for k, v in llm.parameters.items()} == {
        "gpt_model_type": "inflight_fused_batching", "gpt_model_path": "/models/tensorrt_llm/1", "max_beam_width": "1",
        "batch_scheduler_policy": "guaranteed_no_evict", "kv_cache_free_gpu_mem_fraction": "0.9",
        "enable_chunked_context": "true", "exclude_input_in_output": "true"}
    assert cfgs["preprocessing"].parameters["tokenizer_dir"].string_value == "/models/llama/tokenizer"
    ens = cfgs["llama"]
    assert ens.platform == "ensemble" and [s.model_name for s in ens.ensemble_scheduling.step] == [
        "preprocessing", "tensorrt_llm", "postprocessing"]
    assert [i.name for i in ens.input][:8] == ["text_input", "max_tokens", "stream", "temperature", "top_p", "top_k",
                                               "seed", "stop"]
    step = ens.ensemble_scheduling.step[1]
    assert step.input_map["streaming"] == "stream" and step.input_map["runtime_top_k"] == "top_k"
    # every tensor a step maps exists in that model's config, and every ensemble-level name is produced or given
    given = {i.name for i in ens.input}
    for s in ens.ensemble_scheduling.step:
        cfg = cfgs[s.model_name]
        assert set(s.input_map) <= {i.name for i in cfg.input}, s.model_name
        assert set(s.output_map) <= {o.name for o in cfg.output}, s.model_name
        assert set(s.input_map.values()) <= given, s.model_name
        given |= set(s.output_map.values())
    assert {o.name for o in ens.output} <= given
    assert entries["llama"]["settings"]["tokens"] == {"end_id": 2, "pad_id": 1, "pad_from_eos": False,
                                                      "other_end_ids": []}
    trtllm.check(tmp_path / "llama", entries["llama"], runtime_files=False)


def test_engine_build_commands_are_exact(tmp_path):
    entry = render_engine(tmp_path, precision="int8", generation=GEN.model_copy(update={"tensor_parallel": 2}))["llama"]
    steps = trtllm.engine_steps(model_type="llama", precision="int8", generation=GEN.model_copy(
        update={"tensor_parallel": 2}), engine_dir="/models/tensorrt_llm/1")
    assert steps == [
        ["python3", "-c", "import tensorrt_llm; print('tensorrt_llm', tensorrt_llm.__version__)"],
        ["python3", "/app/examples/models/core/llama/convert_checkpoint.py", "--model_dir", "/hf", "--output_dir",
         "/tmp/ckpt", "--dtype", "bfloat16", "--tp_size", "2", "--pp_size", "1", "--use_weight_only",
         "--weight_only_precision", "int8"],
        ["trtllm-build", "--checkpoint_dir", "/tmp/ckpt", "--output_dir", "/models/tensorrt_llm/1", "--gemm_plugin",
         "auto", "--max_batch_size", "64", "--max_input_len", "2048", "--max_seq_len", "4096", "--max_num_tokens",
         "512", "--max_beam_width", "1", "--use_paged_context_fmha", "enable"]]
    setup = [["cp", "-r", f"/app/all_models/inflight_batcher_llm/{m}/1/.", f"/models/{m}/1/"]
             for m in ("preprocessing", "postprocessing", "tensorrt_llm_bls")]
    assert trtllm.ifb_setup_steps() == setup
    command = entry["commands"]["build"]
    assert command.startswith(f"docker run --rm --gpus all --shm-size=2g -v {tmp_path.resolve()}:/models "
                              f"-v {(tmp_path / 'hf').resolve()}:/hf:ro nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3 ")
    assert shlex.split(command)[-1] == " && ".join(shlex.join(s) for s in steps + setup)
    with pytest.raises(UserError, match="no TensorRT-LLM checkpoint converter is known for model_type 'mamba'"):
        trtllm.converter_for("mamba")


def test_engine_build_runs_in_the_image_through_docker(tmp_path):
    entry = render_engine(tmp_path)["llama"]
    container = mock.Mock()
    container.wait.return_value = {"StatusCode": 0}
    container.logs.return_value = b"tensorrt_llm 1.2.1\n[TensorRT-LLM] build done\n"
    client = mock.Mock()
    client.containers.run.return_value = container
    with mock.patch("shutil.which", return_value=None), mock.patch("docker.from_env", return_value=client):
        record = trtllm.build_engine(tmp_path, entry)
    spec = client.containers.run.call_args.kwargs
    requests = spec.pop("device_requests")
    assert requests[0]["Count"] == -1 and requests[0]["Capabilities"] == [["gpu"]]
    assert spec["image"] == "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
    assert spec["volumes"] == {str(tmp_path.resolve()): {"bind": "/models", "mode": "rw"},
                               str((tmp_path / "hf").resolve()): {"bind": "/hf", "mode": "ro"}}
    assert spec["command"][:2] == ["bash", "-c"] and "trtllm-build --checkpoint_dir /tmp/ckpt" in spec["command"][2]
    container.remove.assert_called_once_with(force=True)
    assert record["tensorrt_llm"] == "1.2.1"
    assert json.loads((tmp_path / "tensorrt_llm" / "1" / "build.json").read_text())["tensorrt_llm"] == "1.2.1"


def test_engine_build_runs_locally_inside_the_image(tmp_path):
    entry = render_engine(tmp_path)["llama"]
    done = mock.Mock(returncode=0, stdout="tensorrt_llm 1.2.1\n", stderr="")
    with mock.patch("shutil.which", return_value="/usr/local/bin/trtllm-build"), \
            mock.patch("subprocess.run", return_value=done) as run:
        trtllm.build_engine(tmp_path, entry)
    line = run.call_args.args[0][2]
    assert f"--model_dir {(tmp_path / 'hf').resolve()}" in line
    assert f"--output_dir {tmp_path.resolve()}/tensorrt_llm/1" in line and " /models/" not in line


def install_engine(repo: Path, **build):
    for m in trtllm.IFB_PYTHON:
        (repo / m / "1" / "model.py").write_text("# TensorRT-LLM's file\n")
    config = {"version": build.pop("version", "1.2.1"),
              "pretrained_config": {"mapping": {"world_size": build.pop("world_size", 1)}},
              "build_config": {"max_input_len": 2048, "max_seq_len": 4096, "max_beam_width": 1, **build}}
    (repo / "tensorrt_llm" / "1" / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("build,kwargs,message", [
    ({"version": "1.1.0"}, {}, "engine built with TensorRT-LLM 1.1.0, the server "
                               r"\(nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3\) has 1.2.1; rebuild"),
    ({}, {"serving_version": "0.21.0"}, "engine built with TensorRT-LLM 1.2.1, the server .* has 0.21.0"),
    ({"max_input_len": 512}, {}, "the engine's max_input_len is 512 but generation.max_prompt_tokens is 2048; "
                                 "rebuild the engine with --max_input_len 2048"),
    ({"max_seq_len": 1024}, {}, "the engine's max_seq_len is 1024 but generation.max_total_tokens is 4096"),
    ({"max_beam_width": 4}, {}, "parameters.max_beam_width is 1 but the engine was built with max_beam_width 4"),
    ({"world_size": 2}, {}, r"the engine's world_size is 2 but tensor_parallel x pipeline_parallel is 1 x 1 = 1"),
])
def test_engine_lints(tmp_path, build, kwargs, message):
    entry = render_engine(tmp_path)["llama"]
    install_engine(tmp_path, **build)
    with pytest.raises(UserError, match=message):
        trtllm.check(tmp_path / "llama", entry, **kwargs)


def test_engine_check_accepts_a_matching_build_and_names_missing_pieces(tmp_path):
    entry = render_engine(tmp_path)["llama"]
    with pytest.raises(UserError, match=r"preprocessing/1/model.py: missing .*build command \(llama\)"):
        trtllm.check(tmp_path / "llama", entry)
    install_engine(tmp_path)
    trtllm.check(tmp_path / "llama", entry)
    cfg = tmp_path / "tensorrt_llm" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace("decoupled: true", "decoupled: false"))
    with pytest.raises(UserError, match="tensorrt_llm/config.pbtxt: decoupled is false, so streaming requests"):
        trtllm.check(tmp_path / "llama", entry)
    cfg.write_text(cfg.read_text().replace("inflight_fused_batching", "ifb"))
    (tmp_path / "tensorrt_llm" / "config.pbtxt").write_text(cfg.read_text().replace("decoupled: false", "decoupled: true"))
    with pytest.raises(UserError, match="gpt_model_type 'ifb' is not V1, inflight_batching or inflight_fused_batching"):
        trtllm.check(tmp_path / "llama", entry)


def test_tokenizer_ids_pad_fallback_and_missing_eos(tmp_path):
    ids = common.token_ids(tokenizer_dir(tmp_path / "a", pad=False, eos_ids=[2, 3]), "m")
    assert ids == {"end_id": 2, "pad_id": 2, "pad_from_eos": True, "other_end_ids": [3]}
    with pytest.raises(UserError, match="has no eos token, so generation never stops before max_tokens"):
        common.token_ids(tokenizer_dir(tmp_path / "b", eos=False), "m")
    weights_dir(tmp_path / "a")
    with pytest.raises(UserError, match="the engine flow's preprocessing and postprocessing need the tokenizer"):
        trtllm.render(tmp_path, name="m", weights="a", tokenizer=None, precision="bf16", generation=GEN,
                      serving=SERVING, flow="engine")


def test_world_size_against_visible_gpus():
    common.lint_world_size("m", 2, 2, world_size=4, gpus=4)
    with pytest.raises(UserError, match=r"m: needs 4 GPUs \(tensor_parallel 2 x pipeline_parallel 2\) but 1 is visible"):
        common.lint_world_size("m", 2, 2, gpus=1)


def test_image_versions_and_registry():
    assert trtllm.image_version("nvcr.io/nvidia/tritonserver:25.08-trtllm-python-py3") == "0.21.0"
    assert trtllm.image_version("my/trtllm:latest") is None
    assert TARGETS == {"vllm": vllm, "tensorrt-llm": trtllm}


def test_perf_writes_each_endpoint_its_own_request():
    """perf runs unchanged against our endpoint, vLLM and TensorRT-LLM: the same prompt and length, each in the
    backend's own tensors (the vLLM backend refuses streaming unless exclude_input_in_output is set; its default
    temperature samples, so greedy is sent as 0). The OpenAI front sends the same mapping (test_openai_backends)."""
    from builder.perf.llm import request_entry

    assert request_entry("hi", 8) == {"text_input": ["hi"], "max_tokens": [8], "stream": [True], "ignore_eos": [True]}
    vllm = request_entry("hi", 8, "vllm")
    assert json.loads(vllm.pop("sampling_parameters")[0]) == {"max_tokens": 8, "min_tokens": 8, "ignore_eos": True,
                                                             "temperature": 0.0}
    assert vllm == {"text_input": ["hi"], "stream": [True], "exclude_input_in_output": [True],
                    "return_finish_reason": [True], "return_num_input_tokens": [True], "return_num_output_tokens": [True]}
    assert request_entry("hi", 8, "tensorrt-llm") == {
        "text_input": ["hi"], "streaming": [True], "sampling_param_max_tokens": [8],
        "sampling_param_exclude_input_from_output": [True], "return_finish_reason": [True]}
    assert request_entry("hi", 8, "tensorrt-llm", "engine") == {
        "text_input": ["hi"], "max_tokens": [8], "stream": [True], "exclude_input_in_output": [True],
        "return_num_input_tokens": [True], "return_num_output_tokens": [True]}
    # a sampled load (perf --temperature/--top-p), in each backend's names
    hot = {"temperature": 0.7, "top_p": 0.9}
    assert request_entry("hi", 8, sampling=hot) == {"text_input": ["hi"], "max_tokens": [8], "stream": [True],
                                                    "temperature": [0.7], "top_p": [0.9], "ignore_eos": [True]}
    assert json.loads(request_entry("hi", 8, "vllm", sampling=hot)["sampling_parameters"][0])["top_p"] == 0.9
    trt = request_entry("hi", 8, "tensorrt-llm", sampling=hot)
    assert trt["sampling_param_temperature"] == [0.7] and trt["sampling_param_top_p"] == [0.9]
    assert request_entry("hi", 8, "tensorrt-llm", "engine", sampling=hot)["temperature"] == [0.7]


def test_perf_counts_tokens_from_responses_when_the_backend_sends_no_counts():
    """A profile export as perf_analyzer writes it for a TensorRT-LLM llmapi stream (no num_output_tokens):
    one token per response; with counts (ours, vLLM) a response may carry several."""
    from builder.perf.llm import summarize

    ms = 1_000_000
    plain = {"experiments": [{"experiment": {"mode": "concurrency", "value": 1}, "requests": [
        {"timestamp": 0, "response_timestamps": [10 * ms, 12 * ms, 14 * ms, 16 * ms],
         "response_outputs": [{"text_output": "a"}, {"text_output": "b"}, {"text_output": "c"}, {"text_output": "d"}]}]}]}
    got = summarize(plain, 1)
    assert got["ttft_p50_ms"] == 10 and got["itl_p50_ms"] == 2 and got["tokens_per_s"] == 4 / 0.016
    counted = {"experiments": [{"experiment": {"mode": "concurrency", "value": 1}, "requests": [
        {"timestamp": 0, "response_timestamps": [10 * ms, 16 * ms],
         "response_outputs": [{"num_output_tokens": 1}, {"num_output_tokens": 4}]}]}]}
    got = summarize(counted, 1)
    assert got["itl_p50_ms"] == 2 and got["tokens_per_s"] == 4 / 0.016
    # vLLM and the engine ensemble count each response's own tokens (vllm_backend src/utils/request.py)
    per_response = {"experiments": [{"experiment": {"mode": "concurrency", "value": 1}, "requests": [
        {"timestamp": 0, "response_timestamps": [10 * ms, 16 * ms],
         "response_outputs": [{"num_output_tokens": 1}, {"num_output_tokens": 3}]}]}]}
    got = summarize(per_response, 1, "delta")
    assert got["itl_p50_ms"] == 2 and got["tokens_per_s"] == 4 / 0.016


def test_a_rendered_target_is_measured_when_named():
    from builder.errors import UserError
    from builder.perf.run import select_variants

    manifest = {"models": {"m": {"status": "passed"}, "m_vllm_bf16": {"status": "rendered", "generation": {}},
                           "m_bad": {"status": "failed"}}}
    assert list(select_variants(manifest, None)) == ["m"]
    assert list(select_variants(manifest, ["m_vllm_bf16"])) == ["m_vllm_bf16"]
    with pytest.raises(UserError, match="did not pass verification"):
        select_variants(manifest, ["m_bad"])
