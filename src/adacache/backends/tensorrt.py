"""Build TensorRT engines from the ONNX export, and check ONNX graphs for TensorRT on a CPU.

Building needs a CUDA GPU and the ``tensorrt`` package (``pip install adacache[gpu]``).
Everything that can be checked without one is checked by :func:`check_tensorrt_compatible`:
operators in the TensorRT ONNX parser's support list, 0-D boolean ``If`` predicates, no
custom operator domains, and static shapes for the optimisation profile.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..deploy.manifest import read_manifest, write_manifest
from ..errors import ExportError

# ONNX operators the TensorRT 10 ONNX parser supports (from the onnx-tensorrt operator
# matrix), restricted to the default domain. An op missing here fails the check.
TENSORRT_ONNX_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Identity If
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean Min Mish Mod Mul Neg NonZero Not
    OneHot Or Pad PRelu Pow QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
    Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor""".split()
)


def _walk(graph: Any):
    """Every node of an ONNX graph, including the bodies of If / Loop / Scan."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _walk(attr.g)
            for sub in attr.graphs:
                yield from _walk(sub)


def check_tensorrt_compatible(model_path: str | Path) -> list[str]:
    """Problems that would stop TensorRT from building ``model_path``; empty when none.

    Runs on a CPU with ``onnx`` alone: the operator support list, no custom domains or
    local functions, ``If`` predicates that are 0-D booleans, and static input shapes.
    """
    import onnx

    model = onnx.load(str(model_path))
    inferred = onnx.shape_inference.infer_shapes(model)
    problems: list[str] = []
    if model.functions:
        problems.append(f"local functions (custom ops) present: {[f.name for f in model.functions]}")
    value_types = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    for node in _walk(inferred.graph):
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name} uses custom domain {node.domain!r} ({node.op_type})")
        elif node.op_type not in TENSORRT_ONNX_OPS:
            problems.append(f"node {node.name}: operator {node.op_type} is not in TensorRT's ONNX support list")
        if node.op_type == "If":
            cond = value_types.get(node.input[0])
            if cond is None:
                problems.append(f"If node {node.name}: predicate {node.input[0]} has no inferred type")
            else:
                rank = len(cond.shape.dim) if cond.HasField("shape") else None
                if cond.elem_type != onnx.TensorProto.BOOL or rank != 0:
                    problems.append(
                        f"If node {node.name}: predicate {node.input[0]} must be a 0-D bool, got "
                        f"{onnx.TensorProto.DataType.Name(cond.elem_type)} of rank {rank}"
                    )
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            problems.append(f"input {inp.name} has a dynamic shape; the optimisation profile needs static shapes")
    return problems


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str = "fp16", workspace_gib: float = 4.0) -> Path:
    """Parse ``onnx_path`` with TensorRT and serialise an engine to ``engine_path``.

    Shapes are static (adacache exports one artifact per input signature), so the
    optimisation profile pins min = opt = max to the exported shapes.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ExportError("TensorRT export needs the `tensorrt` package and a CUDA GPU: pip install 'adacache[gpu]'") from exc
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', got {precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    Path(engine_path).write_bytes(bytes(serialized))
    return Path(engine_path)


def export_tensorrt(cached: Any, directory: str | Path, example_inputs: Any, *, precision: str = "fp16", opset: int | None = None) -> Path:
    """ONNX export, compatibility check, engine build; the manifest then names the engine."""
    from .onnx import export_onnx

    out_dir = Path(directory)
    onnx_dir = out_dir / "onnx"
    export_onnx(cached, onnx_dir, example_inputs, opset=opset)
    problems = check_tensorrt_compatible(onnx_dir / "model.onnx")
    if problems:
        raise ExportError("the ONNX export cannot be built by TensorRT:\n  " + "\n  ".join(problems))
    build_engine(onnx_dir / "model.onnx", out_dir / "model.engine", precision=precision)
    manifest = read_manifest(onnx_dir)
    manifest.update(backend="tensorrt", model_file="model.engine", precision=precision, onnx_file="onnx/model.onnx")
    write_manifest(out_dir, manifest)
    shutil.copy(onnx_dir / "manifest.json", onnx_dir / "manifest.onnx.json")
    return out_dir
