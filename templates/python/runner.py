"""Triton python-backend model that runs one built artifact (ONNX with onnxruntime, or a torch
ExportedProgram). Copied unchanged into `<model>/1/model.py`; every setting comes from the config's
`parameters` (runner, artifact, precision, device, threads), so nothing from a spec is spliced into code.

Requests that the dynamic batcher groups are concatenated along the batch axis, run once, and split.
Each request is checked first against the limits the model was built for (parameter `input_limits`:
ids below the vocabulary size, no dim above its maximum, no empty batch); a request that fails gets an
INVALID_ARG error naming the input, and the other requests of the batch still run.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _params(config):
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


class OnnxArtifact:
    def __init__(self, path, params):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        threads = int(params.get("threads", "0"))
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if params.get("device") == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(params.get("device_id", "0"))}))
        self.session = ort.InferenceSession(path, opts, providers=providers)

    def __call__(self, names, arrays, output_names):
        return self.session.run(output_names, dict(zip(names, arrays)))


class TorchArtifact:
    """A torch ExportedProgram. On the GPU, optionally torch.compile'd and/or replayed as CUDA graphs:
    one graph per (batch bucket, sequence bucket), inputs padded up to the bucket (masked tokens, copied
    rows), outputs sliced back. Shapes above the largest bucket run without graphs."""

    def __init__(self, path, params):
        import torch

        self.torch = torch
        threads = int(params.get("threads", "0"))
        if threads:
            torch.set_num_threads(threads)
        gpu = params.get("device") == "gpu" and torch.cuda.is_available()
        if gpu and "device_id" in params:  # the GPU Triton placed this instance on (instance_group gpus)
            torch.cuda.set_device(int(params["device_id"]))
        # an explicit index: the program's device constants and the inputs must compare equal
        self.device = f"cuda:{torch.cuda.current_device()}" if gpu else "cpu"
        self.dtype = getattr(torch, TORCH_DTYPES[params.get("precision", "fp32")])
        module = load_program(torch, path, self.device)
        if params.get("compile", "none") == "inductor":
            module = torch.compile(module, dynamic=True)  # one compile; graphs are captured per bucket
        self.module = module
        self.seq_inputs = set(_names(params.get("seq_inputs", "")))
        self.seq_outputs = set(_names(params.get("seq_outputs", "")))
        self.graphs = {}
        if params.get("cuda_graphs") == "1" and gpu:
            self.batch_buckets = sorted(int(b) for b in _names(params["batch_buckets"]))
            self.seq_buckets = sorted(int(b) for b in _names(params.get("seq_buckets", ""))) or [0]
            self.example = json.loads(params["example_shapes"])  # name -> [dims without batch], dtype
            self._capture()

    def _tensors(self, names, arrays):
        torch = self.torch
        out = []
        for a in arrays:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)
            out.append(t.to(self.dtype) if t.is_floating_point() else t)
        return out

    def _capture(self):
        torch = self.torch
        pool = torch.cuda.graph_pool_handle()
        names = list(self.example)
        for batch in reversed(self.batch_buckets):  # largest first: later graphs reuse its memory
            for seq in reversed(self.seq_buckets):
                static = []
                for name in names:
                    dims, dtype = self.example[name]
                    shape = [batch] + [seq if (name in self.seq_inputs and i == len(dims) - 1) else d
                                       for i, d in enumerate(dims)]
                    fill = torch.ones if name in self.seq_inputs else torch.randn
                    t = fill(shape, dtype=getattr(torch, dtype), device=self.device)
                    static.append(t.to(self.dtype) if t.is_floating_point() else t)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.inference_mode():
                    for _ in range(2):
                        self.module(*static)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
                    outputs = self.module(*static)
                self.graphs[(batch, seq)] = (graph, static, outputs)

    def _bucket(self, names, arrays):
        batch = arrays[0].shape[0]
        seq = next((a.shape[-1] for n, a in zip(names, arrays) if n in self.seq_inputs), 0)
        b = next((x for x in self.batch_buckets if x >= batch), None)
        s = next((x for x in self.seq_buckets if x >= seq), None)
        return (b, s) if b is not None and s is not None else None

    def __call__(self, names, arrays, output_names):
        torch = self.torch
        key = self._bucket(names, arrays) if self.graphs else None
        with torch.inference_mode():
            if key is None:
                out = self.module(*self._tensors(names, arrays))
                return [o.float().cpu().numpy() for o in out]
            graph, static, outputs = self.graphs[key]
            batch = arrays[0].shape[0]
            seq = 0
            for name, a, t in zip(names, self._tensors(names, arrays), static):
                if name in self.seq_inputs:
                    seq = a.shape[-1]
                    t.zero_()  # padded tokens are masked out (mask 0, id 0)
                    t[:batch, :seq].copy_(a)
                    if batch < t.shape[0]:
                        t[batch:, :seq].copy_(a[:1].expand(t.shape[0] - batch, -1))
                else:
                    t[:batch].copy_(a)
                    if batch < t.shape[0]:
                        t[batch:].copy_(a[:1].expand(t.shape[0] - batch, *a.shape[1:]))
            graph.replay()
            result = []
            for name, o in zip(output_names, outputs):
                o = o[:batch, :seq] if name in self.seq_outputs else o[:batch]
                result.append(o.float().cpu().numpy())
            return result


def load_program(torch, path, device):
    """An ExportedProgram's module on `device`: device constants inside the graph move too."""
    program = torch.export.load(path)
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()


def _names(text):
    return [x for x in text.split(",") if x]


RUNNERS = {"onnx": OnnxArtifact, "torch": TorchArtifact}


def concat(batches):
    """Stack the requests' arrays along axis 0; returns the joined arrays and each request's size."""
    sizes = [b[0].shape[0] for b in batches]
    joined = [np.concatenate(cols, axis=0) if len(cols) > 1 else cols[0] for cols in zip(*batches)]
    return joined, sizes


def split(outputs, sizes):
    """Undo concat: one list of output arrays per request."""
    bounds = np.cumsum(sizes)[:-1]
    parts = [np.split(o, bounds, axis=0) for o in outputs]
    return [list(p) for p in zip(*parts)]


def check_request(names, arrays, limits, batched):
    """Why a request's arrays cannot run (one line), or None. `limits`: name -> {"high", "max_dims"}."""
    rows = {}
    for name, a in zip(names, arrays):
        if a.ndim == 0 or a.shape[0] == 0:
            return f"{name}: empty batch (shape {list(a.shape)}); send at least one row"
        rows[name] = a.shape[0]
        limit = limits.get(name, {})
        dims = a.shape[1:] if batched else a.shape
        top = limit.get("max_dims")
        if top and len(top) == len(dims) and any(0 < m < d for d, m in zip(dims, top)):
            return (f"{name}: shape {list(a.shape)} is above the maximum {list(top)} this model was built for "
                    f"(shapes.max_sequence_length in the spec)")
        high = limit.get("high")
        if high is not None and a.size and (a.min() < 0 or a.max() >= high):
            return f"{name}: values must be in [0, {high}) (the vocabulary); got {a.min()} to {a.max()}"
    if len(set(rows.values())) > 1:
        return "inputs have different batch sizes: " + ", ".join(f"{n} {r}" for n, r in rows.items())
    first = {}  # inputs built with the same maximum dims (token ids, mask, types) must agree in shape
    for name, a in zip(names, arrays):
        key = tuple(limits.get(name, {}).get("max_dims") or ())
        if key and key in first and first[key][1].shape != a.shape:
            other, b = first[key]
            return f"{name}: shape {list(a.shape)} differs from {other} {list(b.shape)}; they must be the same"
        first.setdefault(key, (name, a))
    return None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = _params(config)
        self.limits = json.loads(params.get("input_limits", "{}"))
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.out_dtypes = [pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        if args.get("model_instance_kind") == "GPU":
            params["device_id"] = args.get("model_instance_device_id", "0")
        path = os.path.join(args["model_repository"], args["model_version"], params["artifact"])
        kind = params.get("runner", "onnx")
        if kind not in RUNNERS:
            raise pb_utils.TritonModelException(f"unknown runner {kind!r}; expected one of {sorted(RUNNERS)}")
        self.run = RUNNERS[kind](path, params)

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = {}
        for i, r in enumerate(requests):
            arrays = [pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs]
            problem = check_request(self.inputs, arrays, self.limits, self.batched)
            if problem:
                responses[i] = self._invalid(problem)
            else:
                valid[i] = arrays
        batches = list(valid.values())
        same_shapes = len({tuple(a.shape[1:] for a in b) for b in batches}) == 1
        if self.batched and len(batches) > 1 and same_shapes:
            try:
                joined, sizes = concat(batches)
                per_request = split(self.run(self.inputs, joined, self.outputs), sizes)
            except Exception as exc:  # one failure answers every request of the batch with the reason
                per_request = [exc] * len(batches)
        else:
            per_request = []
            for b in batches:
                try:
                    per_request.append(self.run(self.inputs, b, self.outputs))
                except Exception as exc:
                    per_request.append(exc)
        for i, outs in zip(valid, per_request):
            responses[i] = self._error(outs) if isinstance(outs, Exception) else self._response(outs)
        return responses

    def _response(self, outs):
        tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o.astype(d, copy=False)))
                   for n, o, d in zip(self.outputs, outs, self.out_dtypes)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _invalid(text):
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        error = pb_utils.TritonError(text, code) if code is not None else pb_utils.TritonError(text)
        return pb_utils.InferenceResponse(error=error)

    @staticmethod
    def _error(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {first}"))
