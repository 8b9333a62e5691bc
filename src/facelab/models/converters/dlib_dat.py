"""Reader for dlib's serialised face ResNet (`dlib_face_recognition_resnet_model_v1.dat`).

dlib itself is never imported: the byte format is documented in
shared/notes/dlib-resnet-format.md and this module follows it, turning the file into an
ordinary PyTorch state dict for `facelab.models.backbones.dlib_resnet.DlibResNet`.

The file records no layer types for its wrappers (tags, skips and layers all look alike in
its prefix), so the reader walks a fixed plan of dlib's `anet_type` and checks every version
string, shape, stride and padding against it. Newer dlib writers (`con_6`, `affine_2`,
`relu_2`, `fc_3`) add a few flags; they are accepted as long as the network they describe
computes the same function as the plan (e.g. an affine folded into its convolution).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facelab.models.converters.dlib_serialize import DlibStream

# Residual blocks of dlib's `anet_type`, input to output: (output channels, downsamples).
DLIB_RESNET_BLOCKS: tuple[tuple[int, bool], ...] = (
    (32, False), (32, False), (32, False),
    (64, True), (64, False), (64, False), (64, False),
    (128, True), (128, False), (128, False),
    (256, True), (256, False), (256, False),
    (256, True),
)  # fmt: skip
STEM_CHANNELS = 32
EMBEDDING_DIM = 128
INPUT_SIZE = 150

# Version strings this reader understands, per layer kind.
_CON_VERSIONS = ("con_4", "con_5", "con_6")
_AFFINE_VERSIONS = ("affine_", "affine_2")
_RELU_VERSIONS = ("relu_", "relu_2")
_FC_VERSIONS = ("fc_2", "fc_3")
_LOSS_VERSIONS = ("loss_metric_", "loss_metric_2")


@dataclass(frozen=True)
class DlibResNetFile:
    """What a `.dat` file holds: weights plus the input layer's and the loss's settings."""

    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, float, float]  # RGB averages the input layer subtracts (then / 256)
    input_size: int
    margin: float
    distance_threshold: float  # dlib's "same person" Euclidean distance on raw descriptors


@dataclass(frozen=True)
class _Layer:
    """One wrapper of the network in forward order; `kind` "tag"/"skip" has no body."""

    kind: str
    name: str = ""
    out_channels: int = 0
    in_channels: int = 0
    kernel: int = 0
    stride: int = 0
    padding: int = 0


def _plan() -> list[_Layer]:
    """dlib's anet_type, input to output, with the state-dict names of its parameters."""
    layers = [
        _Layer("con", "stem_conv", STEM_CHANNELS, 3, 7, 2, 0),
        _Layer("affine", "stem_affine", STEM_CHANNELS),
        _Layer("relu"),
        _Layer("max_pool", kernel=3, stride=2),
    ]
    channels = STEM_CHANNELS
    for index, (out, down) in enumerate(DLIB_RESNET_BLOCKS):
        prefix = f"blocks.{index}."
        stride, padding = (2, 0) if down else (1, 1)
        layers += [
            _Layer("tag"),
            _Layer("con", prefix + "conv1", out, channels, 3, stride, padding),
            _Layer("affine", prefix + "affine1", out),
            _Layer("relu"),
            _Layer("con", prefix + "conv2", out, out, 3, 1, 1),
            _Layer("affine", prefix + "affine2", out),
        ]
        if down:
            layers += [_Layer("tag"), _Layer("skip"), _Layer("avg_pool", kernel=2, stride=2)]
        layers += [_Layer("add_prev"), _Layer("relu")]
        channels = out
    # avg_pool_everything: a 0x0 window means the whole plane.
    layers += [
        _Layer("avg_pool", kernel=0, stride=1),
        _Layer("fc", "fc", EMBEDDING_DIM, channels),
    ]
    return layers


class _Stream(DlibStream):
    """dlib's primitives plus the DNN tensor records."""

    def tensor(self, what: str) -> np.ndarray:
        start = self.pos
        version = self.integer(f"tensor version of {what}")
        if version != 2:
            raise self.error(f"tensor version {version} for {what}, expected 2", start)
        shape = tuple(self.integer(f"tensor shape of {what}") for _ in range(4))
        if min(shape) < 0:
            raise self.error(f"negative tensor shape {shape} for {what}", start)
        count = math.prod(shape)
        raw = self.take(4 * count, f"float data of {what} ({count} floats)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def alias(self, what: str) -> tuple[int, ...]:
        start = self.pos
        version = self.integer(f"alias_tensor version of {what}")
        if version != 1:
            raise self.error(f"alias_tensor version {version} for {what}, expected 1", start)
        return tuple(self.integer(f"alias_tensor shape of {what}") for _ in range(4))


class _Parser:
    """Walks the plan over the stream, filling a state dict."""

    def __init__(self, stream: _Stream) -> None:
        self.s = stream
        self.state: dict[str, torch.Tensor] = {}
        # A con_6 with a fused relu must be followed by a disabled affine and then a relu;
        # this remembers which convolution is waiting for that pattern.
        self.fused_relu_from = ""

    def require(self, condition: bool, message: str, offset: int) -> None:
        if not condition:
            raise self.s.error(message, offset)

    def con(self, layer: _Layer) -> None:
        s, start = self.s, self.s.pos
        version = s.version(_CON_VERSIONS, f"convolution {layer.name}")
        params = s.tensor(f"{layer.name} params").reshape(-1)
        found = tuple(s.integer(f"{layer.name} geometry") for _ in range(7))
        filters = s.alias(f"{layer.name} filters")
        s.alias(f"{layer.name} biases")
        s.doubles(4, f"{layer.name} learning-rate multipliers")
        use_bias = s.boolean(f"{layer.name} use_bias") if version in ("con_5", "con_6") else True
        use_relu = s.boolean(f"{layer.name} use_relu") if version == "con_6" else False
        k, st, p = layer.kernel, layer.stride, layer.padding
        expected = (layer.out_channels, k, k, st, st, p, p)
        self.require(
            found == expected,
            f"{layer.name}: (filters, nr, nc, stride_y, stride_x, padding_y, padding_x) "
            f"is {found}, expected {expected}",
            start,
        )
        shape = (layer.out_channels, layer.in_channels, k, k)
        self.require(
            filters == shape, f"{layer.name}: filter shape {filters}, expected {shape}", start
        )
        n_weights = math.prod(shape)
        n_params = n_weights + (layer.out_channels if use_bias else 0)
        self.require(
            params.size == n_params,
            f"{layer.name}: {params.size} parameters, expected {n_params}",
            start,
        )
        self.state[layer.name + ".weight"] = torch.from_numpy(params[:n_weights].reshape(shape))
        bias = params[n_weights:] if use_bias else np.zeros(layer.out_channels, np.float32)
        self.state[layer.name + ".bias"] = torch.from_numpy(bias)
        # dlib applies a convolution's fused relu only when it has a bias.
        if use_relu and use_bias:
            self.fused_relu_from = layer.name

    def affine(self, layer: _Layer) -> None:
        s, start = self.s, self.s.pos
        version = s.version(_AFFINE_VERSIONS, f"affine {layer.name}")
        params = s.tensor(f"{layer.name} params").reshape(-1)
        gamma = s.alias(f"{layer.name} gamma")
        beta = s.alias(f"{layer.name} beta")
        mode = s.integer(f"{layer.name} mode")
        disabled = s.boolean(f"{layer.name} disabled") if version == "affine_2" else False
        c = layer.out_channels
        if disabled:  # folded into the convolution before saving: identity
            weight, bias = np.ones(c, np.float32), np.zeros(c, np.float32)
        else:
            self.require(
                not self.fused_relu_from,
                f"{layer.name}: active affine after convolution {self.fused_relu_from} with a "
                "fused relu (not expressible by this network)",
                start,
            )
            self.require(mode == 0, f"{layer.name}: affine mode {mode}, expected 0 (conv)", start)
            shape = (1, c, 1, 1)
            self.require(
                gamma == shape and beta == shape and params.size == 2 * c,
                f"{layer.name}: gamma {gamma}, beta {beta}, {params.size} parameters; "
                f"expected {shape}, {shape}, {2 * c}",
                start,
            )
            weight, bias = params[:c], params[c:]
        self.state[layer.name + ".weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        self.state[layer.name + ".bias"] = torch.from_numpy(np.ascontiguousarray(bias))

    def relu(self, layer: _Layer) -> None:
        s, start = self.s, self.s.pos
        version = s.version(_RELU_VERSIONS, "relu")
        disabled = s.boolean("relu disabled") if version == "relu_2" else False
        self.require(
            not disabled or bool(self.fused_relu_from),
            "disabled relu without a preceding convolution that applies it",
            start,
        )
        self.fused_relu_from = ""

    def pool(self, layer: _Layer) -> None:
        s, start = self.s, self.s.pos
        version = "max_pool_2" if layer.kind == "max_pool" else "avg_pool_2"
        s.version((version,), layer.kind)
        found = tuple(s.integer(f"{layer.kind} geometry") for _ in range(6))
        k, st = layer.kernel, layer.stride
        expected = (k, k, st, st, 0, 0)
        self.require(
            found == expected,
            f"{layer.kind}: (nr, nc, stride_y, stride_x, padding_y, padding_x) is {found}, "
            f"expected {expected}",
            start,
        )

    def add_prev(self, layer: _Layer) -> None:
        self.s.version(("add_prev_",), "add_prev")

    def fc(self, layer: _Layer) -> None:
        s, start = self.s, self.s.pos
        version = s.version(_FC_VERSIONS, "fully connected layer")
        n_out = s.unsigned("fc num_outputs")
        n_in = s.unsigned("fc num_inputs")
        params = s.tensor("fc params").reshape(-1)
        weights = s.alias("fc weights")
        s.alias("fc biases")
        bias_mode = s.integer("fc bias_mode")
        s.doubles(4, "fc learning-rate multipliers")
        if version == "fc_3":
            s.boolean("fc use_bias")
        shape = (layer.in_channels, layer.out_channels)
        self.require(
            (n_in, n_out) == shape and weights == (*shape, 1, 1) and params.size == n_in * n_out,
            f"fc: inputs {n_in}, outputs {n_out}, weights {weights}, {params.size} parameters; "
            f"expected {shape}, no bias",
            start,
        )
        self.require(bias_mode == 1, f"fc: bias_mode {bias_mode}, expected 1 (no bias)", start)
        # dlib stores W input-major (y = x @ W); nn.Linear wants (out, in).
        self.state["fc.weight"] = torch.from_numpy(np.ascontiguousarray(params.reshape(shape).T))

    def trailer(self, version: int, input_side: bool) -> None:
        """The add_layer training state after each body: read and discarded."""
        s = self.s
        for what in ("setup_called", "gradient_input_is_stale", "output_disabled"):
            s.boolean(f"add_layer {what}")
        s.tensor("add_layer x_grad")
        s.tensor("add_layer cached_output")
        if input_side:
            s.tensor("add_layer grad_final")
            if version == 3:
                s.unsigned("add_layer sample_expansion_factor")
        elif version == 2:
            s.tensor("add_layer params_grad")

    def run(self) -> DlibResNetFile:
        s = self.s
        start = s.pos
        if (version := s.integer("loss layer version")) != 1:
            raise s.error(f"loss layer version {version}, expected 1", start)
        loss = s.version(_LOSS_VERSIONS, "loss layer")
        if loss == "loss_metric_2":
            margin, threshold = s.real("loss margin"), s.real("loss distance threshold")
        else:  # the old record implies dlib's former defaults
            margin, threshold = 0.1, 0.75

        plan = _plan()
        versions: dict[int, int] = {}
        # Prefix: one version per wrapper, outermost (output side) first.
        for index in reversed(range(len(plan))):
            start = s.pos
            layer = plan[index]
            found = s.integer("wrapper version")
            if layer.kind in ("tag", "skip"):
                accepted: tuple[int, ...] = (1,)
            else:
                accepted = (2, 3) if index == 0 else (1, 2)
            if found not in accepted:
                raise s.error(
                    f"wrapper version {found} for {layer.kind} {layer.name}".rstrip()
                    + f", expected {' or '.join(map(str, accepted))} (not dlib's face ResNet?)",
                    start,
                )
            versions[index] = found

        start = s.pos
        s.version(("input_rgb_image_sized",), "input layer")
        mean = (s.real("avg_red"), s.real("avg_green"), s.real("avg_blue"))
        size = (s.unsigned("input rows"), s.unsigned("input columns"))
        if size != (INPUT_SIZE, INPUT_SIZE):
            raise s.error(f"input size {size}, expected {(INPUT_SIZE, INPUT_SIZE)}", start)

        readers = {
            "con": self.con,
            "affine": self.affine,
            "relu": self.relu,
            "max_pool": self.pool,
            "avg_pool": self.pool,
            "add_prev": self.add_prev,
            "fc": self.fc,
        }
        for index, layer in enumerate(plan):
            if layer.kind in ("tag", "skip"):
                continue
            start = s.pos
            if self.fused_relu_from and layer.kind not in ("affine", "relu"):
                raise s.error(f"fused relu of {self.fused_relu_from} is never disabled", start)
            readers[layer.kind](layer)
            self.trailer(versions[index], input_side=index == 0)

        if s.pos != len(s.data):
            raise s.error(f"{len(s.data) - s.pos} trailing bytes after the network")
        return DlibResNetFile(self.state, mean, INPUT_SIZE, margin, threshold)


def read_dlib_resnet(path: str | Path) -> DlibResNetFile:
    """Parse dlib's face ResNet file into a state dict for `DlibResNet` (no dlib needed).

    Raises ValueError naming the file and byte offset if the file is truncated, has
    trailing bytes, or does not describe dlib's face ResNet.
    """
    path = Path(path)
    return _Parser(_Stream(path.read_bytes(), str(path))).run()
