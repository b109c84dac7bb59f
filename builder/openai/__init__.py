"""An OpenAI-compatible API in front of a repository's text-generation models (`serve --openai-port P`).

    /v1/models, /v1/models/{id}     the repository's generation models
    /v1/completions                 a prompt (string, strings or token ids) -> text; n, echo, logprobs, stop
    /v1/chat/completions            messages -> the model's chat template -> text; n, logprobs, tools,
                                    response_format (json_object, json_schema), stream_options.include_usage
    /v1/embeddings                  feature-extraction ensembles (text in, EMBEDDING out): floats or base64
    /tokenize, /detokenize          the model's tokenizer
    /health, /version, /metrics     readiness, versions, Prometheus metrics (metrics.py names them)

FastAPI + uvicorn (server.py) in the serve process; each sequence is a gRPC stream to Triton (triton.py).
"""

from builder.openai.server import start_front

__all__ = ["start_front"]
