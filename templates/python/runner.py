"""Triton python-backend model that runs one built artifact (ONNX with onnxruntime, or a torch
ExportedProgram). Copied unchanged into `<model>/1/model.py`; every setting comes from the config's
`parameters` (runner, artifact, precision, device, threads), so nothing from a spec is spliced into code.

Requests that the dynamic batcher groups are concatenated along the batch axis, run once, and split.
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
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(path, opts, providers=providers)

    def __call__(self, names, arrays, output_names):
        return self.session.run(output_names, dict(zip(names, arrays)))


class TorchArtifact:
    def __init__(self, path, params):
        import torch

        self.torch = torch
        threads = int(params.get("threads", "0"))
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if params.get("device") == "gpu" and torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, TORCH_DTYPES[params.get("precision", "fp32")])
        self.module = torch.export.load(path).module().to(self.device)

    def __call__(self, names, arrays, output_names):
        torch = self.torch
        args = []
        for a in arrays:
            t = torch.from_numpy(a).to(self.device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        with torch.inference_mode():
            out = self.module(*args)
        return [o.float().cpu().numpy() for o in out]


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


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = _params(config)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.out_dtypes = [pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        path = os.path.join(args["model_repository"], args["model_version"], params["artifact"])
        kind = params.get("runner", "onnx")
        if kind not in RUNNERS:
            raise pb_utils.TritonModelException(f"unknown runner {kind!r}; expected one of {sorted(RUNNERS)}")
        self.run = RUNNERS[kind](path, params)

    def execute(self, requests):
        batches = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs] for r in requests]
        same_shapes = len({tuple(a.shape[1:] for a in b) for b in batches}) == 1
        if self.batched and len(batches) > 1 and same_shapes:
            try:
                joined, sizes = concat(batches)
                per_request = split(self.run(self.inputs, joined, self.outputs), sizes)
            except Exception as exc:  # one failure answers every request of the batch with the reason
                return [self._error(exc) for _ in requests]
        else:
            per_request = []
            for b in batches:
                try:
                    per_request.append(self.run(self.inputs, b, self.outputs))
                except Exception as exc:
                    per_request.append(exc)
        return [self._error(outs) if isinstance(outs, Exception) else self._response(outs) for outs in per_request]

    def _response(self, outs):
        tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o.astype(d, copy=False)))
                   for n, o, d in zip(self.outputs, outs, self.out_dtypes)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _error(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {first}"))
