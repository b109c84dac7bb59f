"""Run by tests/test_openai_clients.py with the langchain venv's python: ChatOpenAI against the front.
argv: base URL, model. Prints one JSON line of what each call gave."""

import json
import sys

from langchain_openai import ChatOpenAI
from pydantic import BaseModel

base, model = sys.argv[1], sys.argv[2]
llm = ChatOpenAI(base_url=base, api_key="none", model=model, max_tokens=24, temperature=0, max_retries=0)
answer = llm.invoke("What is the capital of France?")
chunks = list(llm.stream("What is the capital of France?", stream_usage=True))
streamed = "".join(c.content for c in chunks)
usage = [c.usage_metadata for c in chunks if c.usage_metadata]


class Capital(BaseModel):
    city: str
    country: str


structured = llm.with_structured_output(Capital).invoke("Name the capital of France and its country.")
tools = ChatOpenAI(base_url=base, api_key="none", model=model, max_tokens=40, temperature=0, max_retries=0)
called = tools.with_structured_output(Capital, method="function_calling").invoke("The capital of France?")
print(json.dumps({"invoke": answer.content, "invoke_usage": answer.usage_metadata, "streamed": streamed,
                  "stream_usage": usage, "structured": structured.model_dump(), "function_calling": called.model_dump()}))
