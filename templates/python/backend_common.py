"""What the python-backend model files share (runner.py, preprocess.py, postprocess.py): error answers, the
torch dtype of each precision, loading an ExportedProgram. Copied beside each model.py in the repository and
imported from there; the builder imports this same file (builder.paths.python_template)."""

# precision -> torch dtype name; int8/int4 are weight-only over bf16 activations (the generation runtime)
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "bfloat16", "int4": "bfloat16"}


def error_response(message, code="INVALID_ARG"):
    """An error answer for one request; INVALID_ARG (HTTP 400) for a bad request, INTERNAL for a failure."""
    import triton_python_backend_utils as pb_utils

    code = getattr(pb_utils.TritonError, code, None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=error)


def load_program(path, device):
    """A saved ExportedProgram's module on `device` ("cpu", "cuda:0"): device constants inside the graph move too."""
    import torch

    program = torch.export.load(str(path))
    if device != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return program.module()
