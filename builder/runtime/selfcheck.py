"""Self-check: one request per model of a served repository, checked against its manifest.

Every declared output must come back present, non-empty and with the declared dims (-1 matches
anything); with a reference file the values must also match it (the model's `min_cosine`, else
allclose with its atol/rtol). This is what catches the python backend's silent empty outputs under
numpy 2. Every model is checked before failing, and the failure lists all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from builder import cpu
from builder.errors import RunError
from builder.manifest import load_reference, read_manifest, signature_of
from builder.runtime.server import ServerHandle
from builder.signature import Signature, TensorSpec, make_inputs

DEFAULT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # when the manifest gives none
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CheckResult:
    model: str
    ok: bool
    max_abs: float | None = None  # over all numeric outputs compared with the reference
    cosine: float | None = None  # the lowest over those outputs
    message: str = ""  # "ok", or one "- output: problem" line per problem
    cpu_missing: tuple[str, ...] = ()  # features of the CPU it was verified on that the serving CPU lacks

    @property
    def cpu_note(self) -> str:
        if not self.cpu_missing:
            return ""
        seen = "as built" if self.ok else "NOT as built"
        return (f"verified on a CPU with {', '.join(self.cpu_missing)}, which this one lacks; "
                f"its reference compared here: {seen}" + (f" (cosine {self.cosine:.6f})" if self.cosine is not None else ""))


def self_check(server: ServerHandle, repo: Path, protocol: str = "http") -> list[CheckResult]:
    """Check every model of `repo`'s manifest on `server`; raise RunError listing every failing model.

    Entries whose status is "failed" (rejected at build time) are skipped. The RunError carries
    the full list as `.results`. `protocol` "grpc" needs no HTTP client libraries (GPU bundle).
    """
    repo = Path(repo)
    entries = {name: entry for name, entry in read_manifest(repo)["models"].items()
               if entry.get("status") not in ("failed", "rendered")}  # rendered: TensorRT-LLM / vLLM, not served here
    if protocol == "grpc":
        from tritonclient.grpc import InferenceServerClient as GrpcClient

        client = GrpcClient(server.grpc_url)
    else:
        from tritonclient.http import InferenceServerClient

        client = InferenceServerClient(server.http_url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
    try:
        results = [check_generator(server.http_url, repo, name, entry, server.models) if "generation" in entry
                   else check_model(client, repo, name, entry, server.models) for name, entry in entries.items()]
    finally:
        client.close()
    results = [with_cpu(r, entries[r.model]) for r in results]
    failed = [r for r in results if not r.ok]
    if failed:
        details = "\n".join(f"{r.model}:\n{r.message}" + (f"\n- {r.cpu_note}: rebuild it on this CPU" if r.cpu_missing else "")
                            for r in failed)
        error = RunError(f"self-check failed for {len(failed)} of {len(results)} model(s): "
                         f"{', '.join(r.model for r in failed)}\n{details}")
        error.results = results
        raise error
    return results


# precisions whose kernels take another code path, and other numbers, where the CPU lacks a feature
CPU_SENSITIVE = ("int8", "int4", "fp16", "bf16")


def with_cpu(result: CheckResult, entry: dict) -> CheckResult:
    """The result, naming what the build CPU had and this one lacks, for a variant whose numbers depend on it."""
    built_with = entry.get("verification", {}).get("cpu", {}).get("features")
    if entry.get("precision") not in CPU_SENSITIVE or not built_with:
        return result
    return replace(result, cpu_missing=tuple(cpu.missing(built_with)))


def check_model(client, repo: Path, name: str, entry: dict, loaded: tuple[str, ...] = ()) -> CheckResult:
    if loaded and name not in loaded:
        return CheckResult(name, False, message=f"- not loaded by the server (loaded: {', '.join(loaded)})")
    sig = signature_of(entry)
    reference = entry.get("reference")
    if reference:
        path = repo / name / reference
        try:
            inputs, expected = load_reference(path)
        except (OSError, ValueError) as exc:  # missing, or pickled object arrays
            text = " ".join(str(exc).split())
            if "Object arrays" in text:
                text += "; save text as fixed-width bytes (dtype 'S') arrays"
            return CheckResult(name, False, message=f"- reference {path}: {text}")
        missing = [spec.name for spec in sig.inputs if spec.name not in inputs]
        if missing:
            return CheckResult(name, False, message=f"- reference {path}: no input {', '.join(missing)}")
    else:
        inputs, expected = make_inputs(sig, batch=1), {}
    try:
        outputs = infer(client, name, sig, inputs)
    except Exception as exc:  # noqa: BLE001 - any client or server error fails this model, with its text
        text = " ".join(str(exc).split())
        if "is not healthy" in text:
            text += " (the python backend stub crashed, see the server log; numpy 2 in its environment does this)"
        return CheckResult(name, False, message=f"- request failed: {text}")
    batch = _batch(sig, inputs)
    tolerance = {**DEFAULT_TOLERANCE, **entry.get("verification", {}).get("tolerance", {})}
    problems: list[str] = []
    diffs: list[float] = []
    cosines: list[float] = []
    for spec in sig.outputs:
        got = outputs.get(spec.name)
        problem = _shape_problem(spec, got, sig.max_batch_size, batch)
        if problem:
            problems.append(f"- {spec.name}: {problem}")
            continue
        if spec.name not in expected:
            continue
        problem, max_abs, cosine = compare(got, expected[spec.name], tolerance)
        if max_abs is not None:
            diffs.append(max_abs)
            cosines.append(cosine)
        if problem:
            problems.append(f"- {spec.name}: {problem}")
    return CheckResult(name, not problems, max(diffs) if diffs else None, min(cosines) if cosines else None,
                       "\n".join(problems) or "ok")


def check_generator(http_url: str, repo: Path, name: str, entry: dict, loaded: tuple[str, ...] = ()) -> CheckResult:
    """A text-generation endpoint: greedy answers to the build's prompts through the HTTP generate
    extension; fp32 must give the build's text exactly, other precisions a non-empty answer."""
    import json

    from builder.generation.client import generate

    if loaded and name not in loaded:
        return CheckResult(name, False, message=f"- not loaded by the server (loaded: {', '.join(loaded)})")
    reference = json.loads((repo / name / entry["reference"]).read_text())
    problems = []
    for i, (prompt, want) in enumerate(zip(reference["prompts"][:2], reference["texts"][:2])):
        try:
            got = generate(http_url, name, prompt["text"], max_tokens=reference["max_tokens"],
                           add_special_tokens=prompt["add_special_tokens"])
        except Exception as exc:  # noqa: BLE001 - the model fails the check with the server's words
            return CheckResult(name, False, message=f"- request failed: {' '.join(str(exc).split())}")
        if entry["precision"] == "fp32" and got.get("text_output") != want:
            problems.append(f"- prompt {i}: {got.get('text_output')!r} differs from the build's {want!r}")
        elif not got.get("text_output") and got.get("finish_reason") != "stop":
            problems.append(f"- prompt {i}: empty answer ({got})")
    return CheckResult(name, not problems, message="\n".join(problems) or "ok")


def infer(client, name: str, sig: Signature, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """One request (HTTP with binary data, or gRPC); every declared output asked for."""
    import tritonclient.grpc as grpc_module

    http = not isinstance(client, grpc_module.InferenceServerClient)
    if http:
        import tritonclient.http as module
    else:
        module = grpc_module
    InferInput = module.InferInput
    binary = {"binary_data": True} if http else {}

    def InferRequestedOutput(name, binary_data=True):  # noqa: N802 - mirrors tritonclient's name
        return module.InferRequestedOutput(name, **binary)

    requests = []
    for spec in sig.inputs:
        array = as_bytes(inputs[spec.name]) if spec.dtype == "bytes" else np.ascontiguousarray(
            inputs[spec.name], dtype=spec.dtype)
        tensor = InferInput(spec.name, list(array.shape), spec.protocol_dtype)
        tensor.set_data_from_numpy(array, **binary)
        requests.append(tensor)
    wanted = [InferRequestedOutput(spec.name, binary_data=True) for spec in sig.outputs]
    result = client.infer(name, requests, outputs=wanted)
    outputs = {}
    for spec in sig.outputs:
        try:
            outputs[spec.name] = result.as_numpy(spec.name)
        except ValueError:  # declared a shape but sent no bytes: report it as empty, not as a reshape error
            if not http or (result.get_output(spec.name) or {}).get("parameters", {}).get("binary_data_size") != 0:
                raise
            outputs[spec.name] = np.empty(0)
    return outputs


def as_bytes(array: np.ndarray) -> np.ndarray:
    """Text as Triton BYTES wants it: an object array of bytes (references store 'S'/'U' arrays)."""
    array = np.asarray(array)
    flat = [x.encode() if isinstance(x, str) else bytes(x) for x in array.reshape(-1).tolist()]
    out = np.empty(len(flat), dtype=np.object_)
    out[:] = flat
    return out.reshape(array.shape)


def _batch(sig: Signature, inputs: dict[str, np.ndarray]) -> int | None:
    if sig.max_batch_size <= 0 or not inputs:
        return None
    return int(np.asarray(next(iter(inputs.values()))).shape[0])


def _shape_problem(spec: TensorSpec, got: np.ndarray | None, max_batch_size: int, batch: int | None) -> str:
    if got is None:
        return "missing from the response"
    if got.size == 0:
        return f"empty (shape {tuple(got.shape)}); the python backend does this under numpy 2"
    declared = ((batch if batch is not None else -1), *spec.dims) if max_batch_size > 0 else spec.dims
    shape = tuple(got.shape)
    if len(shape) != len(declared) or any(d not in (-1, s) for d, s in zip(declared, shape)):
        return f"shape {shape} does not match the declared {tuple(declared)}"
    return ""


def compare(got: np.ndarray, want: np.ndarray, tolerance: dict) -> tuple[str, float | None, float | None]:
    """(problem or "", max abs diff, cosine) of a served output against its reference."""
    want = np.asarray(want)
    if got.dtype == np.object_ or want.dtype.kind in "SUO":
        same = got.shape == want.shape and as_bytes(got).tolist() == as_bytes(want).tolist()
        return ("" if same else "text differs from the reference"), None, None
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} differs from the reference's {tuple(want.shape)}", None, None
    a = got.astype(np.float64).reshape(-1)
    b = want.astype(np.float64).reshape(-1)
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / norms) if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    if "min_cosine" in tolerance and tolerance["min_cosine"] is not None:
        if not cosine >= tolerance["min_cosine"]:
            return f"cosine {cosine:.6f} < {tolerance['min_cosine']} (max diff = {max_abs:.3g})", max_abs, cosine
    elif not np.allclose(a, b, atol=tolerance["atol"], rtol=tolerance["rtol"]):
        return (f"max diff = {max_abs:.3g} (atol {tolerance['atol']}, rtol {tolerance['rtol']}), cosine {cosine:.6f}",
                max_abs, cosine)
    return "", max_abs, cosine
