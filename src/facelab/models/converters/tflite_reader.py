"""TensorFlow Lite flatbuffers -> a PyTorch module that computes the same graph.

facelab reads the weights of small TFLite networks (MediaPipe's BlazeFace) without TensorFlow:
the `tflite` package parses the flatbuffer (operators, tensors, buffers); this module turns the
float graph into torch operations. Constants are read once and dequantized (float16, or int8/
uint8 with scale and zero point). TFLite computes in NHWC; here every 4-D activation is kept
NCHW (weights, paddings, axes and reshapes are translated), so the convolutions run on
PyTorch's fast paths, and TFLite's "SAME" padding (the extra pixel after, never before) is
reproduced exactly.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

INSTALL_HINT = "pip install tflite"
# Operators this reader maps to torch (DEQUANTIZE only on constants).
SUPPORTED_OPS = (
    "ADD",
    "CONCATENATION",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "DEQUANTIZE",
    "MAX_POOL_2D",
    "PAD",
    "PRELU",
    "RELU",
    "RESHAPE",
    "RESIZE_BILINEAR",
)
# NHWC axis -> NCHW axis for 4-D activations.
NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


class TfliteError(ValueError):
    """A .tflite file is missing, malformed or uses what this reader cannot map; the message
    names the file."""


@dataclass(frozen=True)
class TfliteTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # TFLite's type name, "FLOAT32", "FLOAT16", "INT8", ...
    data: np.ndarray | None  # constant contents (raw, before dequantization), None if computed
    scale: np.ndarray | None  # quantization scale(s) and zero point(s), if quantized
    zero_point: np.ndarray | None
    quantized_axis: int


@dataclass(frozen=True)
class TfliteOp:
    name: str  # builtin operator name, e.g. "CONV_2D"
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class TfliteGraph:
    """The first subgraph of a .tflite file, as plain data."""

    path: str
    tensors: list[TfliteTensor]
    ops: list[TfliteOp]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


_NUMPY_TYPES = {
    "FLOAT32": np.float32,
    "FLOAT16": np.float16,
    "INT32": np.int32,
    "INT64": np.int64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT16": np.int16,
}


def _enum_names(enum: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def _options(tflite: Any, op: Any) -> dict[str, Any]:
    """The operator's builtin options as a dict of snake-less getter names -> values."""
    table = op.BuiltinOptions()
    if table is None:
        return {}
    kind = _enum_names(tflite.BuiltinOptions)[op.BuiltinOptionsType()]
    options = getattr(tflite, kind)()
    options.Init(table.Bytes, table.Pos)
    getters = (
        "Padding",
        "StrideW",
        "StrideH",
        "FusedActivationFunction",
        "DilationWFactor",
        "DilationHFactor",
        "DepthMultiplier",
        "FilterWidth",
        "FilterHeight",
        "Axis",
        "AlignCorners",
        "HalfPixelCenters",
    )
    return {g: getattr(options, g)() for g in getters if hasattr(options, g)}


def read_tflite(path: str | os.PathLike) -> TfliteGraph:
    """Parse a .tflite file's first subgraph: its tensors, constants and operators."""
    path = Path(path)
    try:
        import tflite
    except ImportError as exc:
        raise TfliteError(f"{path}: reading .tflite files needs `{INSTALL_HINT}`") from exc
    try:
        data = bytearray(path.read_bytes())
    except OSError as exc:
        raise TfliteError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) < 8 or bytes(data[4:8]) != b"TFL3":
        raise TfliteError(f"{path}: not a TensorFlow Lite model (no TFL3 identifier)")
    try:
        return _parse(tflite, data, str(path))
    except TfliteError:
        raise
    except Exception as exc:  # a corrupt flatbuffer fails anywhere inside the generated code
        raise TfliteError(
            f"{path}: malformed TFLite flatbuffer ({type(exc).__name__}: {exc})"
        ) from exc


def _parse(tflite: Any, data: bytearray, path: str) -> TfliteGraph:
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.SubgraphsLength() < 1:
        raise TfliteError(f"{path}: the model has no subgraph")
    graph = model.Subgraphs(0)
    op_names = _enum_names(tflite.BuiltinOperator)
    type_names = _enum_names(tflite.TensorType)
    tensors = []
    for i in range(graph.TensorsLength()):
        t = graph.Tensors(i)
        dtype = type_names.get(t.Type(), str(t.Type()))
        shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        raw = model.Buffers(t.Buffer()).DataAsNumpy() if t.Buffer() > 0 else 0
        const = None
        if not isinstance(raw, int) and raw.size:
            if dtype not in _NUMPY_TYPES:
                raise TfliteError(f"{path}: tensor {i} has unsupported type {dtype}")
            const = raw.view(_NUMPY_TYPES[dtype])
            if t.Sparsity() is None:  # sparse constants stay flat: only DENSIFY reads them
                if const.size != int(np.prod(shape)):
                    raise TfliteError(
                        f"{path}: tensor {i} holds {const.size} values for shape {shape}"
                    )
                const = const.reshape(shape)
        q = t.Quantization()
        scale = zero = None
        axis = 0
        if q is not None and q.ScaleLength():
            scale, zero, axis = q.ScaleAsNumpy(), q.ZeroPointAsNumpy(), q.QuantizedDimension()
        name = t.Name().decode(errors="replace")
        tensors.append(TfliteTensor(name, shape, dtype, const, scale, zero, axis))
    ops = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        # Codes above 127 live in BuiltinCode; older files only fill the deprecated byte.
        number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = op_names.get(number, f"operator {number}")
        if number == tflite.BuiltinOperator.CUSTOM:
            name = f"CUSTOM {code.CustomCode().decode(errors='replace')}"
        ops.append(
            TfliteOp(
                name,
                tuple(int(k) for k in op.InputsAsNumpy()),
                tuple(int(k) for k in op.OutputsAsNumpy()),
                _options(tflite, op),
            )
        )
    inputs = tuple(int(k) for k in graph.InputsAsNumpy())
    outputs = tuple(int(k) for k in graph.OutputsAsNumpy())
    return TfliteGraph(path, tensors, ops, inputs, outputs)


def dequantize(t: TfliteTensor) -> np.ndarray:
    """A constant tensor's float32 values (float16 widened; int8/uint8 scaled per axis)."""
    assert t.data is not None
    if t.scale is None or t.data.dtype.kind == "f":
        return t.data.astype(np.float32)
    shape = [1] * t.data.ndim
    if t.scale.size > 1:
        shape[t.quantized_axis] = -1
    scale = t.scale.astype(np.float32).reshape(shape)
    zero = t.zero_point.astype(np.float32).reshape(shape)
    return ((t.data.astype(np.float32) - zero) * scale).astype(np.float32)


def _activation(code: int, path: str) -> Callable[[Tensor], Tensor]:
    """TFLite's fused activation (0 none, 1 RELU, 2 RELU_N1_TO_1, 3 RELU6, 4 TANH), in place:
    it only ever applies to the fresh output of its own operator."""
    table = {
        0: lambda x: x,
        1: torch.relu_,
        2: lambda x: x.clamp_(-1, 1),
        3: lambda x: x.clamp_(0, 6),
        4: torch.tanh_,
    }
    if code not in table:
        raise TfliteError(f"{path}: unsupported fused activation {code}")
    return table[code]


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TFLite's 'SAME' padding (before, after) of one axis: the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _Step(nn.Module):
    """One operator: reads `inputs` from the value table, writes `output`."""

    def __init__(self, fn: Callable[..., Tensor], inputs: list[int], output: int) -> None:
        super().__init__()
        self.fn = fn
        self.inputs = inputs
        self.output = output

    def forward(self, *args: Tensor) -> Tensor:
        return self.fn(*args)


class _Conv(nn.Module):
    """A convolution (or depthwise one) with TFLite's padding and fused activation.

    A 1x1 convolution of stride 1 runs as one matrix product on the channels-last pixels:
    PyTorch's CPU convolution takes a slow im2col path for these few-channel 1x1 layers (3x
    the time of the whole depthwise part of BlazeFace, with layout copies).
    """

    def __init__(
        self, conv: nn.Conv2d, pad: tuple[int, int, int, int], act: Callable[[Tensor], Tensor]
    ) -> None:
        super().__init__()
        self.conv, self.pad, self.act = conv, pad, act
        self.pointwise = (
            conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.groups == 1
            and not any(self.pad)
            and conv.padding == (0, 0)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.pointwise:
            b, c, h, w = x.shape
            pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view when channels-last
            y = F.linear(pixels, self.conv.weight.view(-1, c), self.conv.bias)
            return self.act(y.view(b, h, w, -1).permute(0, 3, 1, 2))
        if any(self.pad):
            x = F.pad(x, self.pad)
        return self.act(self.conv(x))


class TfliteModule(nn.Module):
    """The graph as torch operations: (B, 3, H, W) float input (NCHW) -> the graph's outputs,
    4-D ones NCHW, others as TFLite shapes them (batch first)."""

    def __init__(self, graph: TfliteGraph) -> None:
        super().__init__()
        self.path = graph.path
        if len(graph.inputs) != 1:
            raise TfliteError(f"{graph.path}: expected one input, found {len(graph.inputs)}")
        self.input = graph.inputs[0]
        self.input_shape = graph.tensors[self.input].shape  # NHWC, as TFLite states it
        self.outputs = list(graph.outputs)
        self._graph = graph
        self._consts: dict[int, np.ndarray] = {
            i: dequantize(t) for i, t in enumerate(graph.tensors) if t.data is not None
        }
        for op in graph.ops:
            if op.name not in SUPPORTED_OPS:
                raise TfliteError(
                    f"{graph.path}: operator {op.name} is not supported "
                    f"(supported: {', '.join(SUPPORTED_OPS)})"
                )
            if op.name == "DEQUANTIZE":
                if op.inputs[0] not in self._consts:
                    raise TfliteError(f"{graph.path}: DEQUANTIZE of a computed tensor")
                self._consts[op.outputs[0]] = self._consts[op.inputs[0]]
        self._producer = {out: op for op in graph.ops for out in op.outputs}
        self._uses = Counter(i for op in graph.ops for i in op.inputs)
        self._uses.update(self.outputs)
        self._folded = self._fold_channel_pads(graph.ops)
        self.steps = nn.ModuleList(
            self._build(op)
            for op in graph.ops
            if op.name != "DEQUANTIZE" and op.outputs[0] not in self._folded
        )
        del self._graph, self._consts, self._producer, self._uses

    def _fresh(self, index: int) -> bool:
        """Whether the tensor may be overwritten by its one consumer: computed by an operator
        into memory of its own (not a reshaped view, not the caller's input), read only once."""
        op = self._producer.get(index)
        return (
            op is not None and op.name not in ("RESHAPE", "DEQUANTIZE") and self._uses[index] == 1
        )

    def _fold_channel_pads(self, ops: list[TfliteOp]) -> dict[int, tuple[int, int]]:
        """BlazeFace's shortcuts zero-pad channels, then ADD: instead, add the unpadded tensor
        into the channel slice of the other (fresh) summand, in place. Returns, per folded PAD
        output, its input and first channel."""
        folded = {}
        for op in ops:
            if op.name != "ADD" or len(op.inputs) != 2:
                continue
            for padded, other in (op.inputs, op.inputs[::-1]):
                pad = self._producer.get(padded)
                if pad is None or pad.name != "PAD" or self._uses[padded] != 1:
                    continue
                pads = self._consts.get(pad.inputs[1])
                if pads is None or pads.shape != (4, 2) or pads[:3].any() or not self._fresh(other):
                    continue
                if self._shape(other) == self._shape(op.outputs[0]):
                    folded[padded] = (pad.inputs[0], int(pads[3, 0]))
                    break
        return folded

    def _const(self, index: int) -> np.ndarray:
        if index not in self._consts:
            raise TfliteError(f"{self.path}: tensor {index} must be a constant here")
        return self._consts[index]

    def _shape(self, index: int) -> tuple[int, ...]:
        return self._graph.tensors[index].shape

    def _build(self, op: TfliteOp) -> _Step:
        """The torch step computing `op` (inputs that are constants are baked in)."""
        o = op.options
        computed = [i for i in op.inputs if i >= 0 and i not in self._consts]
        out = op.outputs[0]
        if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            return _Step(self._conv(op), computed, out)
        if op.name == "MAX_POOL_2D":
            k, s = (o["FilterHeight"], o["FilterWidth"]), (o["StrideH"], o["StrideW"])
            pad = self._padding(op.inputs[0], k, s, (1, 1), o["Padding"])
            act = _activation(o["FusedActivationFunction"], self.path)

            def pool(x: Tensor) -> Tensor:
                if any(pad):
                    x = F.pad(x, pad, value=float("-inf"))
                return act(F.max_pool2d(x, k, s))

            return _Step(pool, computed, out)
        if op.name == "ADD":
            act = _activation(o["FusedActivationFunction"], self.path)
            folded = [i for i in computed if i in self._folded]
            if folded:
                (other,) = [i for i in computed if i != folded[0]]
                source, first = self._folded[folded[0]]

                def add_into(a: Tensor, x: Tensor) -> Tensor:
                    a[:, first : first + x.shape[1]] += x
                    return act(a)

                return _Step(add_into, [other, source], out)
            if len(computed) == 2:
                a, b = computed
                if self._fresh(a) and self._shape(a) == self._shape(out):
                    return _Step(lambda x, y: act(x.add_(y)), computed, out)
                return _Step(lambda x, y: act(x + y), computed, out)
            other = self._layout(self._const(next(i for i in op.inputs if i in self._consts)))
            bias = torch.from_numpy(other)
            return _Step(lambda a: act(a + bias), computed, out)
        if op.name == "RELU":
            return _Step(torch.relu_ if self._fresh(computed[0]) else F.relu, computed, out)
        if op.name == "PRELU":
            alpha = torch.from_numpy(self._layout(self._const(op.inputs[1])))
            return _Step(lambda x: torch.where(x >= 0, x, x * alpha), computed, out)
        if op.name == "PAD":
            pads = self._const(op.inputs[1]).astype(int)
            if len(pads) == 4:
                pads = pads[[0, 3, 1, 2]]  # NHWC -> NCHW
            flat = tuple(int(v) for pair in pads[::-1] for v in pair)  # last axis first
            return _Step(lambda x: F.pad(x, flat), computed, out)
        if op.name == "RESHAPE":
            in_4d, out_shape = len(self._shape(op.inputs[0])) == 4, self._shape(out)
            rest = out_shape[1:]

            def reshape(x: Tensor) -> Tensor:
                if in_4d:
                    x = x.permute(0, 2, 3, 1)
                y = x.reshape(x.shape[0], *rest)
                return y.permute(0, 3, 1, 2) if len(rest) == 3 else y

            return _Step(reshape, computed, out)
        if op.name == "CONCATENATION":
            axis = o["Axis"] % len(self._shape(out))
            if len(self._shape(out)) == 4:
                axis = NCHW_AXIS[axis]
            act = _activation(o["FusedActivationFunction"], self.path)
            return _Step(lambda *xs: act(torch.cat(xs, dim=axis)), computed, out)
        # RESIZE_BILINEAR
        size = tuple(int(v) for v in self._const(op.inputs[1]))
        if o["AlignCorners"]:
            align = True
        elif o["HalfPixelCenters"]:
            align = False
        else:
            raise TfliteError(f"{self.path}: RESIZE_BILINEAR with legacy pixel centres")
        return _Step(
            lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=align),
            computed,
            out,
        )

    def _layout(self, value: np.ndarray) -> np.ndarray:
        """A broadcast constant (…, C) in NHWC order -> its NCHW equivalent (C, 1, 1)."""
        if value.ndim == 0 or value.size == 1:
            return value.reshape(()).copy()
        if value.ndim == 4:
            return np.ascontiguousarray(value.transpose(0, 3, 1, 2))
        return value.reshape(-1, 1, 1).copy()

    def _padding(
        self,
        index: int,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        dilation: tuple[int, int],
        mode: int,
    ) -> tuple[int, int, int, int]:
        """F.pad's (left, right, top, bottom) for TFLite padding mode 0 SAME / 1 VALID."""
        if mode == 1:
            return (0, 0, 0, 0)
        _, h, w, _ = self._shape(index)
        top, bottom = same_padding(h, kernel[0], stride[0], dilation[0])
        left, right = same_padding(w, kernel[1], stride[1], dilation[1])
        return (left, right, top, bottom)

    def _conv(self, op: TfliteOp) -> _Conv:
        o = op.options
        weight = self._const(op.inputs[1])  # CONV_2D (O, H, W, I); depthwise (1, H, W, C*M)
        bias = self._const(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        in_channels = self._shape(op.inputs[0])[3]
        if op.name == "DEPTHWISE_CONV_2D":
            weight = weight.transpose(3, 0, 1, 2)
            groups = in_channels
        else:
            weight = weight.transpose(0, 3, 1, 2)
            groups = 1
        out_channels, _, kh, kw = weight.shape
        stride, dilation = (
            (o["StrideH"], o["StrideW"]),
            (o["DilationHFactor"], o["DilationWFactor"]),
        )
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            (kh, kw),
            stride=stride,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            if bias is not None:
                conv.bias.copy_(torch.from_numpy(bias))
        pad = self._padding(op.inputs[0], (kh, kw), stride, dilation, o["Padding"])
        if pad[0] == pad[1] and pad[2] == pad[3]:  # symmetric: let the convolution pad
            conv.padding = (pad[2], pad[0])
            pad = (0, 0, 0, 0)
        return _Conv(conv, pad, _activation(o["FusedActivationFunction"], self.path))

    def forward(self, x: Tensor) -> list[Tensor]:
        values = {self.input: x}
        for step in self.steps:
            values[step.output] = step(*(values[i] for i in step.inputs))
        return [values[i] for i in self.outputs]


def load_tflite(path: str | os.PathLike) -> TfliteModule:
    """Read a .tflite file into an evaluation-mode `TfliteModule`."""
    return TfliteModule(read_tflite(path)).eval()
