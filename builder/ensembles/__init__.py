"""Ensembles: raw text and images in, answers out.

For a model whose spec has an `ensemble:` section, the build adds, next to its verified variants:

- `{name}_pre` (templates/python/preprocess.py): text -> the model's token tensors, with the model's
  own fast tokenizer saved as `1/tokenizer.json` (padding to the longest text, truncation at
  `ensemble.max_length`, default the model's input length limit); and/or encoded images (JPEG, PNG, ...)
  -> pixel_values, with `1/image_processor.json` resolved from the model's preprocessor_config.json
  (else transformers' CLIP / ViT defaults at the signature's image size);
- `{name}_post` (templates/python/postprocess.py): feature-extraction -> EMBEDDING (the model's pooling:
  cls, mean or max from 1_Pooling/config.json, with the attention mask; L2 normalized; with
  `outputs: [sentence_embedding]` the model did both and the vector is handed on as it is); classifiers ->
  PROBABILITIES and LABELS (softmax, top-k, class names in `1/labels.json`); CLIP -> PROBABILITIES over
  the candidate labels (SigLIP: a sigmoid per label);
- the ensemble `{name}` over `ensemble.variant` (default: the first variant that passed) and, with
  `per_variant: true`, `{name}_{tag}_ensemble` for every variant that passed (`{name}_{tag}` is
  already the variant's own name for single-part models). All ensembles of a model share its pre
  and post models.

The python models are ordinary modules copied unchanged; their settings are config `parameters` and
JSON files beside them, written here as data. Every tensor name, dtype and dim of the pre/post
models and of the ensembles' maps is derived from the variants' signatures; steps are wired by
tensor name, and the staged configs go through `check_ensembles` before they are returned.

CLIP. Its ensemble takes IMAGE (encoded images, shape [images]) and LABELS (candidate label strings,
shape [labels]) and returns PROBABILITIES [images, labels] (softmax over the labels of logit_scale x
cosine). The two inputs have unrelated lengths, so no shared batch dimension can carry them: the
CLIP ensemble and its pre/post models use max_batch_size 0 with the batch axis written out as -1.
The towers keep their own max_batch_size and dynamic batching; Triton reads the first axis of the
[images, ...] and [labels, ...] tensors as their batch sizes, so one request holds at most the image
tower's max_batch_size images and the text tower's max_batch_size labels (the pre model says so
in its error). One pre model handles both inputs, so a bad request fails before the ensemble
branches: in Triton 2.51 an error in one of two parallel branches leaks the ensemble's in-flight
request (seen here: the server then waits for them at shutdown and can crash). A single python
"pipeline" model per tower was the alternative; this keeps the towers exactly as verified and
served on their own, and every step visible to Triton's scheduler and metrics.

Verification. At build time the expected answers come from the original PyTorch model with
transformers' own tokenizer / image processor (sentence-transformers' recipe for embeddings,
`logits_per_image` for CLIP), on real inputs: sentences of different lengths (unicode, an empty
string, one longer than max_length), images made with Pillow (sizes, RGB / RGBA / L / P, JPEG /
PNG / GIF). The same inputs go through the pipeline in-process (the python models' own code and
files, the variant's artifact, wired as the ensemble is). The numbers (worst cosine for embeddings,
top-1 agreement and probability difference for classifiers) are the entry's "verification"; the
expected answers are its reference.npz, which builder.runtime.self_check and `check_ensemble_e2e`
compare with what the served ensemble returns. Text and images are stored as fixed-width bytes
(dtype 'S'), which load_reference accepts.

Layout: `plan` (the pieces and their wiring), `processing` (tokenizer / image settings), `references`
(real inputs, PyTorch answers, numbers), `inprocess` (the pipeline without Triton), `build` (staging
and checking the ensembles), `wiring` (`check_ensembles`, used by `validate`), `served`
(`check_ensemble_e2e`, used by the self-check).
"""

from builder.ensembles.build import build_ensembles, ensembles_to_build
from builder.ensembles.inprocess import run_in_process
from builder.ensembles.plan import PYTHON_MODELS, Plan, make_plan, python_model, variant_name
from builder.ensembles.references import (CANDIDATE_LABELS, E2E_TEXTS, IMAGE_KINDS, compare_answers,
                                          embedding_numbers, probability_numbers, sample_images)
from builder.ensembles.served import check_ensemble_e2e
from builder.ensembles.wiring import check_ensembles

__all__ = ["CANDIDATE_LABELS", "E2E_TEXTS", "IMAGE_KINDS", "PYTHON_MODELS", "Plan", "build_ensembles",
           "check_ensemble_e2e", "check_ensembles", "compare_answers", "embedding_numbers", "ensembles_to_build",
           "make_plan", "probability_numbers", "python_model", "run_in_process", "sample_images", "variant_name"]
