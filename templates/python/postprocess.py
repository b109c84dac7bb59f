"""Triton python-backend model: a model's raw outputs in, answers out (an ensemble's post-processing).

Copied unchanged into `<model>/1/model.py`; configured only by its config `parameters` and, for
classifiers, `1/labels.json` beside it. Parameter `task` picks what it does; parameter `tensors`
(JSON) names the tensors it reads and writes by role:

- `embedding`: {"hidden", "mask"} -> {"embedding"}: mean of the token vectors where the attention mask
  is 1 (parameter `pooling`: `mean`, `cls` for the first token, `max` for the largest value over the
  unmasked tokens), then L2-normalized when parameter
  `normalize` is `true` (sentence-transformers' all-MiniLM recipe);
- `pooled`: {"vector"} -> {"embedding"}: a sentence vector the model already pooled (and normalized where its
  recipe says so: the spec's `outputs: [sentence_embedding]`), handed on as float32;
- `classification`: {"logits"} -> {"probabilities", "labels"}: softmax, then the `top_k` most probable
  classes, most probable first (ties: lower class index first), with their names from `labels.json`;
- `zero-shot`: {"image", "text"} (embeddings of a batch of images and of the candidate labels) ->
  {"probabilities"} [images, labels]: softmax over the labels of `logit_scale` x cosine similarity,
  as CLIP computes `logits_per_image`; with parameter `activation` `sigmoid` (SigLIP), a sigmoid of
  it plus `logit_bias`, each label on its own.

Each request is answered on its own; one that fails gets an error response with the reason.
The functions above `TritonPythonModel` need no Triton: the builder runs them in-process to verify
the ensemble, and tests import them.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backend_common import error_response  # noqa: E402 - beside this file

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported by the builder or tests, outside the python backend
    pb_utils = None

ROLES = {
    "embedding": (("hidden", "mask"), ("embedding",)),
    "pooled": (("vector",), ("embedding",)),
    "classification": (("logits",), ("probabilities", "labels")),
    "zero-shot": (("image", "text"), ("probabilities",)),
}


def l2_normalize(x, axis=-1, eps=1e-12):
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)


def pool(hidden, mask, pooling="mean"):
    """[batch, length, dim] token vectors -> [batch, dim]; `mean` over the tokens whose mask is 1."""
    hidden = np.asarray(hidden, dtype=np.float32)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling not in ("mean", "max"):
        raise ValueError(f"unknown pooling {pooling!r}; use mean, cls or max")
    weights = np.asarray(mask).astype(np.float32)[..., None]
    if weights.shape[:2] != hidden.shape[:2]:
        raise ValueError(f"attention mask shape {list(weights.shape[:2])} does not match the hidden states' "
                         f"{list(hidden.shape[:2])}")
    if pooling == "max":  # sentence-transformers: padded positions set to -1e9 first
        return np.where(weights > 0, hidden, np.float32(-1e9)).max(axis=1)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def softmax(x, axis=-1):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def top_k(probabilities, k):
    """(values, indices), each [batch, k], most probable first; ties keep the lower index first."""
    order = np.argsort(-probabilities, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(probabilities, order, axis=-1), order


def classify(logits, labels, k):
    """logits [batch, classes] -> (probabilities [batch, k] float32, names [batch, k] object of bytes)."""
    logits = np.asarray(logits)
    if logits.shape[-1] != len(labels):
        raise ValueError(f"logits have {logits.shape[-1]} classes but labels.json names {len(labels)}")
    values, indices = top_k(softmax(logits), min(k, len(labels)))
    encoded = np.array([label.encode("utf-8") for label in labels], dtype=np.object_)
    return values, encoded[indices]


def zero_shot(image_embeds, text_embeds, logit_scale, logit_bias=0.0, activation="softmax"):
    """[images, dim] and [labels, dim] -> probabilities [images, labels]."""
    image = l2_normalize(np.asarray(image_embeds, dtype=np.float32))
    text = l2_normalize(np.asarray(text_embeds, dtype=np.float32))
    logits = float(logit_scale) * image @ text.T + float(logit_bias)
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    return softmax(logits, axis=-1)


class PostProcessor:
    """{role: array} -> {role: array} for one request, as parameter `task` says."""

    def __init__(self, params, labels=None):
        self.task = params["task"]
        if self.task not in ROLES:
            raise ValueError(f"unknown task {self.task!r}; expected one of {sorted(ROLES)}")
        self.pooling = params.get("pooling", "mean")
        self.normalize = params.get("normalize", "true") == "true"
        self.k = int(params.get("top_k", "5"))
        self.logit_scale = float(params.get("logit_scale", "1.0"))
        self.logit_bias = float(params.get("logit_bias", "0.0"))
        self.activation = params.get("activation", "softmax")
        self.labels = labels
        if self.task == "classification" and not labels:
            raise ValueError("classification needs labels.json with the class names")

    def __call__(self, inputs):
        if self.task == "embedding":
            emb = pool(inputs["hidden"], inputs["mask"], self.pooling)
            return {"embedding": l2_normalize(emb) if self.normalize else emb}
        if self.task == "pooled":
            return {"embedding": np.asarray(inputs["vector"], dtype=np.float32)}
        if self.task == "classification":
            probabilities, names = classify(inputs["logits"], self.labels, self.k)
            return {"probabilities": probabilities, "labels": names}
        return {"probabilities": zero_shot(inputs["image"], inputs["text"], self.logit_scale, self.logit_bias,
                                           self.activation)}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.join(args["model_repository"], args["model_version"])
        self.tensors = json.loads(params["tensors"])
        in_roles, out_roles = ROLES[params["task"]]
        missing = [role for role in in_roles + out_roles if role not in self.tensors]
        if missing:
            raise pb_utils.TritonModelException(f"parameter 'tensors' does not name role(s) {missing}")
        self.in_roles, self.out_roles = in_roles, out_roles
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        labels = None
        if params.get("labels"):
            with open(os.path.join(here, params["labels"]), encoding="utf-8") as f:
                labels = json.load(f)
        self.process = PostProcessor(params, labels)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                inputs = {role: pb_utils.get_input_tensor_by_name(request, self.tensors[role]).as_numpy()
                          for role in self.in_roles}
                outputs = self.process(inputs)
                tensors = []
                for role in self.out_roles:
                    name = self.tensors[role]
                    value = outputs[role]
                    dtype = self.dtypes[name]
                    value = value if dtype == np.object_ else value.astype(dtype, copy=False)
                    tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value)))
            except Exception as exc:  # noqa: BLE001 - answer with the reason instead of crashing the stub
                responses.append(error_response(f"post-processing failed: {type(exc).__name__}: {exc}", "INTERNAL"))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
