"""ONNX fp32 -> fp16, inputs and outputs kept fp32, numerically sensitive ops kept in fp32."""

from __future__ import annotations

import argparse
from pathlib import Path

# Ops whose fp16 versions lose too much (reductions, exp, softmax); kept in fp32 with casts around.
# LayerNormalization is not listed: onnxruntime's kernel accumulates in fp32 already, and blocking it
# makes the converter define a shared weight's cast twice (an invalid model).
KEEP_FP32 = ["ReduceMean", "Pow", "Sqrt", "Softmax", "Exp", "Erf", "Range", "CumSum"]


def convert(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(KEEP_FP32))
    model16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=block, disable_shape_infer=True)
    drop_repeated_casts(model16.graph)
    unique_node_names(model16.graph)
    onnx.save(model16, str(dst), save_as_external_data=model16.ByteSize() > (1 << 30))


def drop_repeated_casts(graph) -> None:
    """A tensor that feeds several fp32-kept ops (decoder LMs, ALBERT's shared layers) gets one Cast per
    consumer, all defining the same `<tensor>_cast_to_fp32`: onnxruntime refuses the model ("Duplicate
    definition of name"). Keep the first of identical nodes; the later ones define nothing new."""
    first: dict[str, object] = {}
    repeated = []
    for node in graph.node:
        earlier = [first[o] for o in node.output if o in first]
        if earlier and all(e.op_type == node.op_type and list(e.input) == list(node.input)
                           and list(e.output) == list(node.output) and e.attribute == node.attribute for e in earlier):
            repeated.append(node)
            continue
        for o in node.output:
            first.setdefault(o, node)
    for node in repeated:
        graph.node.remove(node)


def unique_node_names(graph) -> None:
    """The converter names a cast after the tensor it casts; a tensor cast twice gives two equal names,
    which onnxruntime rejects. Suffix the repeats."""
    seen: dict[str, int] = {}
    for node in graph.node:
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    convert(args.src, args.dst)
