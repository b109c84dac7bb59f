"""ONNX -> TensorRT engine (`model.plan`) with trtexec.

Where trtexec runs decides the TensorRT version, and an engine only loads in the TensorRT (and on the
GPU architecture) that built it. So by default the build runs inside the NGC Triton image that will
serve it (`nvcr.io/nvidia/tritonserver:<tag>-py3` ships trtexec), through the Docker SDK; when
`trtexec` is on PATH (inside that container, or a local TensorRT install) it runs directly. The
TensorRT version and the GPU's compute capability are read from that run and recorded next to the
engine (`model.plan.json`) and in the manifest; `check_compatible` refuses a mismatch.
Numerics are checked with the same tool: `trtexec --loadEngine --loadInputs --exportOutput` on the
verification samples.

Not executed in this project's environment: there is no TensorRT and no Docker engine here. The
tests check the exact trtexec command lines and container spec.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from builder.errors import RunError, UserError

from builder.deploy import ngc

# The serving image, and so the TensorRT the engine is built with; TensorRT per tag: builder.deploy.ngc
DEFAULT_IMAGE = ngc.DEFAULT_IMAGE
TRTEXEC_IN_IMAGE = "/usr/src/tensorrt/bin/trtexec"
FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "int8": ["--int8", "--fp16"]}  # int4: refused by the spec
WORK = "/work"  # where the build folder is mounted in the container


def check_available(where: str) -> None:
    if shutil.which("trtexec"):
        return
    from builder.runtime.docker import docker_available

    if docker_available():
        return
    raise UserError(f"{where}: format tensorrt needs TensorRT (python package tensorrt) or a Docker engine to run "
                    "the NGC Triton container; neither is here; drop the variant or build on a GPU machine")


def profile_shapes(inputs, max_batch_size: int, batch_in_dims: bool = False) -> dict[str, tuple]:
    """(min, opt, max) shape of every input for the optimization profile, from the signature."""
    shapes = {}
    for t in inputs:
        dims = list(t.dims)
        lo = [1 if d == -1 else d for d in dims]
        opt = list(t.example_shape())
        hi = [m if d == -1 else d for d, m in zip(dims, t.max_dims or dims)]
        if any(h == -1 for h in hi):
            raise UserError(f"input {t.name}: TensorRT needs a maximum for every dynamic dim (shapes: in the spec)")
        if not batch_in_dims:
            top = max(max_batch_size, 1)
            lo, opt, hi = [1, *lo], [max(1, top // 2), *opt], [top, *hi]
        shapes[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def _shape_arg(shapes: dict[str, tuple], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in shapes.items())


def build_argv(onnx: str, plan: str, precision: str, shapes: dict[str, tuple], trtexec: str = "trtexec") -> list[str]:
    return [trtexec, f"--onnx={onnx}", f"--saveEngine={plan}", *FLAGS[precision],
            f"--minShapes={_shape_arg(shapes, 0)}", f"--optShapes={_shape_arg(shapes, 1)}",
            f"--maxShapes={_shape_arg(shapes, 2)}", "--skipInference"]


def run_argv(plan: str, feeds: dict[str, str], shapes: dict[str, tuple[int, ...]], out: str,
             trtexec: str = "trtexec") -> list[str]:
    """One inference on given inputs (raw little-endian files), outputs exported as JSON."""
    return [trtexec, f"--loadEngine={plan}", "--shapes=" + ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in shapes.items()),
            "--loadInputs=" + ",".join(f"{n}:{f}" for n, f in feeds.items()), f"--exportOutput={out}",
            "--iterations=1", "--warmUp=0", "--duration=0"]


def container_spec(workdir: Path, argv: list[str], image: str = DEFAULT_IMAGE) -> dict:
    """Keyword arguments for docker's `containers.run`: trtexec in the serving image, GPUs, workdir at /work."""
    from docker.types import DeviceRequest

    return dict(image=image, command=[TRTEXEC_IN_IMAGE, *argv[1:]], working_dir=WORK,
                volumes={str(Path(workdir).resolve()): {"bind": WORK, "mode": "rw"}},
                device_requests=[DeviceRequest(count=1, capabilities=[["gpu"]])],
                detach=True, shm_size="1g", labels={"triton-builder": "onnx2trt"})


def _run(argv: list[str], workdir: Path, image: str) -> str:
    """trtexec locally when on PATH, else in the image; returns its output; RunError with its tail on failure."""
    if shutil.which("trtexec"):
        proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RunError(f"trtexec failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        return proc.stdout + proc.stderr
    from builder.runtime.docker import run_to_completion

    return run_to_completion(container_spec(workdir, argv, image), what=f"trtexec in {image}", timeout=3600)


def tensorrt_version(log: str) -> str:
    match = re.search(r"TensorRT version: (\d+)\.?(\d+)?\.?(\d+)?", log) or re.search(r"TensorRT v(\d+)(\d{2})(\d{2})\]", log)
    if not match:
        raise RunError("trtexec did not print its TensorRT version; cannot record what the engine needs")
    return ".".join(str(int(g)) for g in match.groups() if g is not None)


def compute_capability(log: str) -> str:
    match = re.search(r"Compute Capability: (\d+\.\d+)", log)
    if not match:
        raise RunError("trtexec did not print the GPU's compute capability")
    return match.group(1)


def build_engine(onnx: Path, plan: Path, precision: str, shapes: dict[str, tuple], image: str = DEFAULT_IMAGE) -> dict:
    """Build `plan` next to a copy of `onnx`; write and return its record (version, GPU, command)."""
    workdir = plan.parent
    for f in onnx.parent.glob(onnx.name + "*"):  # the model and its external data
        shutil.copy2(f, workdir / f.name)
    argv = build_argv(onnx.name, plan.name, precision, shapes)
    log = _run(argv, workdir, image)
    record = {"tensorrt": tensorrt_version(log), "compute_capability": compute_capability(log),
              "image": None if shutil.which("trtexec") else image, "command": argv}
    for f in workdir.glob(onnx.name + "*"):
        f.unlink()
    (workdir / "model.plan.json").write_text(json.dumps(record, indent=1))
    return record


def run_engine(plan: Path, feeds: dict[str, np.ndarray], image: str = DEFAULT_IMAGE) -> dict[str, np.ndarray]:
    """Run the engine once on `feeds` with trtexec; outputs as float arrays."""
    workdir = plan.parent
    files = {}
    for name, value in feeds.items():
        path = workdir / f"in_{name}.bin"
        value.astype(value.dtype.newbyteorder("<")).tofile(path)
        files[name] = path.name
    try:
        _run(run_argv(plan.name, files, {n: v.shape for n, v in feeds.items()}, "out.json"), workdir, image)
        exported = json.loads((workdir / "out.json").read_text())
    finally:
        for f in [*files.values(), "out.json"]:
            (workdir / f).unlink(missing_ok=True)
    return {o["name"]: np.asarray(o["values"], dtype=np.float32).reshape([int(d) for d in o["dimensions"].split("x")])
            for o in exported}


def check_compatible(record: dict, *, tensorrt: str | None, compute_capability: str | None, where: str) -> None:
    """Refuse an engine built by another TensorRT (major.minor) or for another GPU architecture."""
    built = record.get("tensorrt", "?")
    if tensorrt is not None and built.split(".")[:2] != tensorrt.split(".")[:2]:
        raise UserError(f"{where}: engine built with TensorRT {built}, the target has {tensorrt}; rebuild it in the "
                        f"target's image (tensorrt variants are built inside the serving image)")
    cc = record.get("compute_capability")
    if compute_capability is not None and cc != compute_capability:
        raise UserError(f"{where}: engine built for compute capability {cc}, this GPU is {compute_capability}; "
                        "engines do not move between GPU architectures; rebuild on the target GPU")


def image_tensorrt(image: str) -> str | None:
    """The TensorRT version of an NGC Triton image tag, when published (builder.deploy.ngc)."""
    return ngc.tensorrt(image)


def local_gpu() -> str | None:
    """Compute capability of this machine's first GPU (nvidia-smi), or None without one."""
    if not shutil.which("nvidia-smi"):
        return None
    proc = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return proc.stdout.split()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def check_repository(repo: Path, manifest: dict, image: str | None) -> None:
    """Before serving: every engine must match the serving TensorRT (the image's) and this GPU."""
    target = image_tensorrt(image) if image else None
    gpu = local_gpu()
    for name, entry in manifest.get("models", {}).items():
        if "tensorrt" in entry:
            record = entry["tensorrt"]
            built_in = record.get("image")
            if image and target is None and built_in != image:
                # no published TensorRT version for this image: only the image that built it is known to fit
                where = f"in {built_in}" if built_in else f"with a local TensorRT {record.get('tensorrt', '?')}"
                fix = f"serve with --image {built_in}" if built_in else "serve it where it was built (--runtime local)"
                raise UserError(f"{repo}/{name}: engine built {where}, serving in {image}, whose TensorRT version "
                                f"is not in the NGC release table; {fix} or rebuild the engine in the serving image")
            check_compatible(record, tensorrt=target, compute_capability=gpu, where=f"{repo}/{name}")
