"""End to end on a served repository: the ensemble's reference inputs through Triton, against the build's
answers."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from builder.ensembles.references import embedding_numbers, probability_numbers
from builder.errors import UserError
from builder.manifest import load_reference, read_manifest, signature_of, write_manifest


def check_ensemble_e2e(server, repo: Path, name: str, *, record: bool = False) -> dict:
    """Send the ensemble's reference inputs (real text / images) through the served ensemble, all in one
    request and then one item per request, and compare with the PyTorch answers stored at build time.

    Returns the numbers (embeddings: worst cosine; classifiers / CLIP: top-1 agreement, max probability
    difference), "passed" and one line per problem. With `record` they go into the manifest entry's
    verification["served"].
    """
    from tritonclient.http import InferenceServerClient

    from builder.runtime.selfcheck import TIMEOUT_S, infer

    repo = Path(repo)
    manifest = read_manifest(repo)
    entry = manifest["models"].get(name)
    if entry is None or entry.get("role") != "ensemble":
        known = sorted(n for n, e in manifest["models"].items() if e.get("role") == "ensemble")
        raise UserError(f"{name}: not an ensemble of {repo} (ensembles: {', '.join(known) or 'none'})")
    sig = signature_of(entry)
    inputs, expected = load_reference(repo / name / entry["reference"])
    # one item per request: each text or image; CLIP's candidate LABELS go whole with every request
    item = next(t.name for t in sig.inputs if t.name != "LABELS")
    count = inputs[item].shape[0]
    requests = [(slice(0, count), inputs)] + [
        (slice(i, i + 1), {k: (v[i:i + 1] if k == item else v) for k, v in inputs.items()}) for i in range(count)]
    client = InferenceServerClient(server.http_url, connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
    problems: list[str] = []
    merged: dict[str, list] = defaultdict(list)
    try:
        for rows, feeds in requests:
            try:
                got = infer(client, name, sig, feeds)
            except Exception as exc:  # noqa: BLE001 - report the server's answer with the request
                problems.append(f"request of items {rows.start}..{rows.stop - 1}: {' '.join(str(exc).split())}")
                continue
            for key, value in got.items():
                merged[key].append((rows, value))
    finally:
        client.close()
    tolerance = entry.get("verification", {}).get("tolerance", {})
    result: dict = {"model": name, "variant": entry.get("variant"), "requests": len(requests), "items": int(count)}
    if not problems:
        result.update(_served_numbers(merged, expected, tolerance, problems))
    result["passed"] = not problems
    result["problems"] = problems
    if record:
        entry.setdefault("verification", {})["served"] = result
        write_manifest(repo, manifest)
    return result


def _served_numbers(merged: dict, expected: dict, tolerance: dict, problems: list[str]) -> dict:
    """Served answers (per request rows) against the expected ones; appends a line per problem."""
    out: dict = {}
    if "EMBEDDING" in expected:
        cosines, diffs = [], []
        for rows, value in merged["EMBEDDING"]:
            numbers = embedding_numbers(value, expected["EMBEDDING"][rows])
            cosines.append(numbers["cosine"])
            diffs.append(numbers["max_abs"])
        out.update(cosine=min(cosines), max_abs=max(diffs))
        floor = tolerance.get("min_cosine") or 0.999
        if out["cosine"] < floor:
            problems.append(f"EMBEDDING: cosine {out['cosine']:.6f} < {floor}")
        return out
    atol = tolerance.get("atol", 1e-4)
    agreement, diffs, unexplained, labels = [], [], 0, True
    for index, (rows, probabilities) in enumerate(merged["PROBABILITIES"]):
        got = {"PROBABILITIES": probabilities}
        want = {"PROBABILITIES": expected["PROBABILITIES"][rows]}
        if "LABELS" in expected:
            got["LABELS"], want["LABELS"] = merged["LABELS"][index][1], expected["LABELS"][rows]
        numbers = probability_numbers(got, want, atol)
        agreement.append((numbers["top1_agreement"], rows.stop - rows.start))
        diffs.append(numbers["max_abs"])
        unexplained += numbers["top1_unexplained"]
        labels = labels and numbers["labels_match"] is not False
    out["top1_agreement"] = sum(a * n for a, n in agreement) / sum(n for _, n in agreement)
    out["max_abs"] = max(diffs)
    if "LABELS" in expected:
        out["labels_match"] = labels
    if out["max_abs"] > atol:
        problems.append(f"PROBABILITIES: max abs diff {out['max_abs']:.3g} > {atol:g}")
    if unexplained:
        problems.append(f"top-1 differs on {unexplained} input(s) with a clear margin")
    return out
