"""Triton python-backend model that runs one built artifact (ONNX with onnxruntime, or a torch
ExportedProgram). Copied unchanged into `<model>/1/model.py`; every setting comes from the config's
`parameters` (runner, artifact, precision, device, threads), so nothing from a spec is spliced into code.

Requests that the dynamic batcher groups are joined along the batch axis, run once, and split.
Each request's shapes are checked first against the limits the model was built for (parameter
`input_limits`: no dim above its maximum, no empty batch); token ids must lie below the vocabulary
size, which is checked once on the joined batch (and per request only when the batch fails). A request
that fails gets an INVALID_ARG error naming the input, and the other requests of the batch still run.

Tensors. The onnx runner reads inputs as numpy arrays and answers with numpy arrays. The torch runner
moves no data through numpy: inputs come in through DLPack (`Tensor.to_dlpack`, no copy; on a GPU
instance the config sets FORCE_CPU_ONLY_INPUT_TENSORS "no", so an input already on the GPU stays there),
the requests of a batch are joined with one `torch.cat` (into pinned memory on a GPU) and copied once
into the CUDA graph's static buffers (or moved once to the device), and each output is converted to
its config dtype and brought to the CPU once per batch, then split into per-request views that go back
through `Tensor.from_dlpack` without another copy.

Clock. With TRITON_BUILDER_CLOCK=SECONDS in the server's environment, each instance logs (INFO) every
SECONDS where its batches' time went inside `execute` (requests: fetch + shape checks; join; run: copies
and launch, or the whole forward when eager; outputs: waiting for the device, the copy back and the
split; responses) and between two `execute` calls. Set against the server's "compute infer" per batch,
the rest is the python backend's own work per request (the stub's IPC), outside this file.
"""

import gc
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backend_common import TORCH_DTYPES, error_response, load_program  # noqa: E402 - beside this file

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by tests, outside the python backend
    pb_utils = None



class Clock:
    """Milliseconds per batch in each phase of `execute`, logged every `seconds` (see the module doc)."""

    PHASES = ("requests", "join", "run", "outputs", "responses")

    def __init__(self, name, seconds, log):
        self.name, self.seconds, self.log = name, seconds, log
        self.last = self.ended = None
        self._reset()

    def _reset(self):
        self.spent = dict.fromkeys(self.PHASES + ("between",), 0.0)
        self.batches = self.rows = 0
        self.window = time.perf_counter()

    def start(self):
        self.last = time.perf_counter()
        if self.ended is not None and self.last - self.ended < self.seconds:  # longer: the instance was idle
            self.spent["between"] += self.last - self.ended

    def mark(self, phase):
        now = time.perf_counter()
        self.spent[phase] += now - self.last
        self.last = now

    def stop(self, rows):
        self.ended = time.perf_counter()
        self.batches += 1
        self.rows += rows
        if self.ended - self.window >= self.seconds:
            self.flush()

    def flush(self):
        if self.batches:
            n = self.batches
            inside = sum(self.spent[p] for p in self.PHASES)
            parts = ", ".join(f"{p} {1e3 * self.spent[p] / n:.3f}" for p in self.PHASES)
            self.log(f"execute clock of {self.name}: {n} batches, {self.rows / n:.1f} rows a batch; ms a batch: "
                     f"{parts}, in execute {1e3 * inside / n:.3f}, between executes {1e3 * self.spent['between'] / n:.3f}")
        self._reset()


class NoClock:
    def start(self):
        pass

    def mark(self, phase):
        pass

    def stop(self, rows):
        pass

    def flush(self):
        pass


def freeze_heap():
    """Leave what loading made (torch, inductor's compiled code, CUDA graphs: ~0.5 M objects) out of the garbage
    collector's scans (gc.freeze); returns how many. A full collection over it took 60-300 ms, a stall of every
    request in flight when one strikes while serving (on the H100 one such pause stopped every stream for 65 ms)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


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

    @staticmethod
    def fetch(tensor):
        return tensor.as_numpy()

    @staticmethod
    def join(name, arrays):
        return np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]

    @staticmethod
    def respond(names, outputs, sizes, dtypes):
        """One list of pb_utils.Tensor per request, from the batch's outputs."""
        per_request = split(outputs, sizes)
        return [[pb_utils.Tensor(n, np.ascontiguousarray(o.astype(d, copy=False))) for n, o, d in zip(names, outs, dtypes)]
                for outs in per_request]


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
        module = load_program(path, self.device)
        if params.get("compile", "none") == "inductor":
            module = torch.compile(module, dynamic=True)  # one compile; graphs are captured per bucket
        self.module = module
        self.seq_inputs = set(_names(params.get("seq_inputs", "")))
        self.seq_outputs = set(_names(params.get("seq_outputs", "")))
        self.staging = {}  # GPU: input name -> pinned buffer the batch is joined into
        self.pinned = gpu
        self.graphs = {}
        if params.get("cuda_graphs") == "1" and gpu:
            self.batch_buckets = sorted(int(b) for b in _names(params["batch_buckets"]))
            self.seq_buckets = sorted(int(b) for b in _names(params.get("seq_buckets", ""))) or [0]
            self.example = json.loads(params["example_shapes"])  # name -> [dims without batch], dtype
            self._capture()

    def fetch(self, tensor):
        """The request's input as a torch tensor on the same memory (DLPack: no copy)."""
        return self.torch.utils.dlpack.from_dlpack(tensor.to_dlpack())

    def join(self, name, tensors):
        """The requests' tensors of one input along the batch axis: one copy (into pinned memory on a GPU
        instance, so the copy to the device is fast)."""
        torch = self.torch
        if len(tensors) == 1:
            return tensors[0]
        if not self.pinned or tensors[0].is_cuda:
            return torch.cat(tensors)
        shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
        size = math.prod(shape)
        buffer = self.staging.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != tensors[0].dtype:
            buffer = self.staging[name] = torch.empty(size, dtype=tensors[0].dtype, pin_memory=True)
        return torch.cat(tensors, out=buffer[:size].view(shape))

    def respond(self, names, outputs, sizes, dtypes):
        """One list of pb_utils.Tensor per request: each output converted and brought to the CPU once, then
        split into views (no copy) handed over through DLPack."""
        torch, to_dlpack = self.torch, self.torch.utils.dlpack.to_dlpack
        outputs = [o.to(torch_dtype(torch, d)).cpu().contiguous() for o, d in zip(outputs, dtypes)]
        parts = [torch.split(o, sizes) if len(sizes) > 1 else (o,) for o in outputs]
        return [[pb_utils.Tensor.from_dlpack(n, to_dlpack(p)) for n, p in zip(names, views)] for views in zip(*parts)]

    def _tensors(self, tensors):
        # to the device first, then the dtype: a cross-device copy that also converts would convert on the
        # CPU first (torch's copy_), with the instance's intra-op threads
        return [t.to(self.device, non_blocking=True).to(self.dtype) if t.is_floating_point()
                else t.to(self.device, non_blocking=True) for t in tensors]

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
                    t = static_input(torch, shape, dtype, name in self.seq_inputs, self.device)
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

    def __call__(self, names, tensors, output_names):
        """The outputs (torch tensors, on the device) of one batch."""
        torch = self.torch
        key = self._bucket(names, tensors) if self.graphs else None
        with torch.inference_mode():
            if key is None:
                return list(self.module(*self._tensors(tensors)))
            graph, static, outputs = self.graphs[key]
            batch = tensors[0].shape[0]
            seq = 0
            for name, a, t in zip(names, tensors, static):  # one copy per input per batch; padding from the device
                if name in self.seq_inputs:
                    seq = a.shape[-1]
                    t[:, seq:].zero_()  # padded tokens are masked out (mask 0, id 0)
                    t[:batch, :seq].copy_(a, non_blocking=True)
                    if batch < t.shape[0]:
                        t[batch:, :seq].copy_(t[:1, :seq].expand(t.shape[0] - batch, -1))
                else:  # a float input crosses in its own dtype and is converted on the device
                    t[:batch].copy_(a.to(t.device, non_blocking=True) if a.dtype != t.dtype else a, non_blocking=True)
                    if batch < t.shape[0]:
                        t[batch:].copy_(t[:1].expand(t.shape[0] - batch, *t.shape[1:]))
            graph.replay()
            return [o[:batch, :seq] if name in self.seq_outputs else o[:batch] for name, o in zip(output_names, outputs)]


def static_input(torch, shape, dtype, seq_input, device):
    """A CUDA graph's static input buffer, filled with values valid for any model: ones for the sequence
    inputs (mask-like), random normals for floating inputs, zeros for other integers (ids, uint8 pixels:
    `randn` has no integer kernel). The graph does not depend on the values; replays copy requests in."""
    dtype = getattr(torch, dtype)
    if seq_input:
        return torch.ones(shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def torch_dtype(torch, numpy_dtype):
    return torch.from_numpy(np.zeros(0, dtype=numpy_dtype)).dtype


def _names(text):
    return [x for x in text.split(",") if x]


RUNNERS = {"onnx": OnnxArtifact, "torch": TorchArtifact}


def split(outputs, sizes):
    """Undo the join: one list of output arrays per request."""
    bounds = np.cumsum(sizes)[:-1]
    parts = [np.split(o, bounds, axis=0) for o in outputs]
    return [list(p) for p in zip(*parts)]


def _count(a):
    return a.numel() if callable(getattr(a, "numel", None)) else a.size


def _bounds(a):
    """(min, max) of a numpy array or torch tensor, as Python numbers."""
    if hasattr(a, "aminmax"):
        low, high = a.aminmax()
        return low.item(), high.item()
    return a.min(), a.max()


def check_values(names, arrays, limits):
    """Why some ids are outside their vocabulary (one line), or None."""
    for name, a in zip(names, arrays):
        high = limits.get(name, {}).get("high")
        if high is not None and _count(a):
            low, top = _bounds(a)
            if low < 0 or top >= high:
                return f"{name}: values must be in [0, {high}) (the vocabulary); got {low} to {top}"
    return None


def check_request(names, arrays, limits, batched, values=True):
    """Why a request's arrays (numpy or torch) cannot run (one line), or None. `limits`: name -> {"high",
    "max_dims"}. values=False checks shapes only (the values are checked on the joined batch)."""
    rows = {}
    for name, a in zip(names, arrays):
        if a.ndim == 0 or a.shape[0] == 0:
            return f"{name}: empty batch (shape {list(a.shape)}); send at least one row"
        rows[name] = a.shape[0]
        limit = limits.get(name, {})
        dims = tuple(a.shape[1:] if batched else a.shape)
        top = limit.get("max_dims")
        if top and len(top) == len(dims) and any(0 < m < d for d, m in zip(dims, top)):
            return (f"{name}: shape {list(a.shape)} is above the maximum {list(top)} this model was built for "
                    f"(shapes.max_sequence_length in the spec)")
    if len(set(rows.values())) > 1:
        return "inputs have different batch sizes: " + ", ".join(f"{n} {r}" for n, r in rows.items())
    first = {}  # inputs built with the same maximum dims (token ids, mask, types) must agree in shape
    for name, a in zip(names, arrays):
        key = tuple(limits.get(name, {}).get("max_dims") or ())
        if key and key in first and tuple(first[key][1].shape) != tuple(a.shape):
            other, b = first[key]
            return f"{name}: shape {list(a.shape)} differs from {other} {list(b.shape)}; they must be the same"
        first.setdefault(key, (name, a))
    return check_values(names, arrays, limits) if values else None


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
        try:
            seconds = float(os.environ.get("TRITON_BUILDER_CLOCK") or 0)
        except ValueError:
            raise pb_utils.TritonModelException(f"TRITON_BUILDER_CLOCK={os.environ['TRITON_BUILDER_CLOCK']!r}: "
                                                "expected seconds between clock lines, e.g. 1 (or unset)") from None
        name = f"{args.get('model_name', '?')} ({args.get('model_instance_name', '?')})"
        self.clock = Clock(name, seconds, pb_utils.Logger.log_info) if seconds > 0 else NoClock()
        pb_utils.Logger.log_info(f"{name} ready: {freeze_heap()} objects left out of the garbage collector's scans")

    def execute(self, requests):
        run, names, clock = self.run, self.inputs, self.clock
        clock.start()
        responses = [None] * len(requests)
        valid, checked = {}, {}  # checked: the shape check's verdict per distinct set of shapes (usually one)
        for i, r in enumerate(requests):
            arrays = [run.fetch(pb_utils.get_input_tensor_by_name(r, n)) for n in names]
            shapes = tuple(tuple(a.shape) for a in arrays)
            if shapes not in checked:
                checked[shapes] = check_request(names, arrays, self.limits, self.batched, values=False)
            if checked[shapes]:
                responses[i] = self._invalid(checked[shapes])
            else:
                valid[i] = arrays
        clock.mark("requests")
        groups = []  # (request indices, their joined inputs): each runs once
        rows_apart = {tuple(s[1:] for s in shapes) for shapes, problem in checked.items() if not problem}
        if self.batched and len(valid) > 1 and len(rows_apart) == 1:
            joined = [run.join(n, cols) for n, cols in zip(names, zip(*valid.values()))]
            if check_values(names, joined, self.limits) is not None:  # rare: find who, run the others
                for i in list(valid):
                    problem = check_values(names, valid[i], self.limits)
                    if problem:
                        responses[i] = self._invalid(problem)
                        del valid[i]
                joined = [run.join(n, cols) for n, cols in zip(names, zip(*valid.values()))] if valid else None
            if valid:
                groups.append((list(valid), joined))
        else:
            for i, arrays in valid.items():
                problem = check_values(names, arrays, self.limits)
                if problem:
                    responses[i] = self._invalid(problem)
                else:
                    groups.append(([i], arrays))
        clock.mark("join")
        rows = 0
        for members, arrays in groups:
            try:
                outputs = run(names, arrays, self.outputs)
                clock.mark("run")
                sizes = [valid[i][0].shape[0] for i in members]
                tensors = run.respond(self.outputs, outputs, sizes, self.out_dtypes)
                clock.mark("outputs")
                for i, answer in zip(members, tensors):
                    responses[i] = pb_utils.InferenceResponse(output_tensors=answer)
                clock.mark("responses")
                rows += sum(sizes)
            except Exception as exc:  # one failure answers every request of the batch with the reason
                for i in members:
                    responses[i] = self._error(exc)
        clock.stop(rows)
        return responses

    def finalize(self):
        self.clock.flush()

    @staticmethod
    def _invalid(text):
        return error_response(text)

    @staticmethod
    def _error(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {first}"))
