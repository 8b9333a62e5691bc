"""ONNX export of a model's backbone, and onnxruntime inference behind the `FaceModel` interface.

Why: deployments embed faces without PyTorch (insightface ships ONNX models run by
onnxruntime). The exported graph maps a float (N, 3, S, S) input to the backbone's
unnormalised features (N, D), with a dynamic batch axis; `FaceModel` L2-normalises them (after
adding the mirrored face's features for flip) exactly as it does for the PyTorch backbone.

The model's preprocessing spec, name, constructor arguments and fingerprint travel in the
file's metadata_props, so `load_onnx` rebuilds a model that aligns and normalises faces as the
original did, and a gallery built with the PyTorch model accepts it (same fingerprint: the
outputs agree to float tolerance). An int8-quantised file gets a fingerprint of its own, since
its embeddings differ measurably from the original's.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from facelab.fileio import atomic_write
from facelab.models.face_model import FaceModel
from facelab.models.operating_points import operating_points
from facelab.models.preprocess import Preprocess

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INPUT, OUTPUT = "input", "features"
KEY = "facelab."  # prefix of every metadata_props key facelab writes
QUANTIZATIONS = ("none", "int8")
DEFAULT_OPSET = 17
# The export is refused when ONNX and PyTorch embeddings of a random batch are less alike.
MIN_COSINE = 0.9999


class OnnxError(ValueError):
    """An ONNX file cannot be exported, read or trusted; the message says why."""


@dataclass(frozen=True)
class ExportReport:
    path: str
    bytes: int
    quantization: str
    fingerprint: str
    max_abs_diff: float  # of unnormalised features on a random batch, vs PyTorch
    min_cosine: float  # of the embeddings on that batch, vs PyTorch


def _metadata(model: FaceModel, quantization: str, fingerprint: str) -> dict[str, str]:
    return {
        f"{KEY}format_version": str(FORMAT_VERSION),
        f"{KEY}model": json.dumps(model.describe(), default=str),
        f"{KEY}fingerprint": fingerprint,
        f"{KEY}embedding_dim": str(model.embedding_dim),
        f"{KEY}quantization": quantization,
        f"{KEY}output": f"{OUTPUT}: unnormalised; L2-normalise to get the embedding",
    }


def _set_metadata(data: bytes, props: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _quantized_fingerprint(fingerprint: str, quantization: str) -> str:
    return hashlib.sha256(f"{fingerprint}|{quantization}".encode()).hexdigest()[:16]


def _quantize_int8(data: bytes) -> bytes:
    """Dynamic int8 quantisation of weights (activations quantised on the fly at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory(prefix="facelab-quant-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(data)
        root.setLevel(logging.ERROR)  # the quantizer logs a line per tensor on the root logger
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        return dst.read_bytes()


def onnx_bytes(model: FaceModel, opset: int = DEFAULT_OPSET, quantization: str = "none") -> bytes:
    """The serialised ONNX model of `model`'s backbone, metadata included."""
    if quantization not in QUANTIZATIONS:
        raise OnnxError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    model = model.cpu().eval()
    size = model.preprocess.size
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter (dynamo=False) warns that it is legacy; it needs no
        # onnxscript and exports every facelab backbone with a dynamic batch axis.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.backbone,
            torch.zeros(2, 3, size, size),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    data = buf.getvalue()
    fingerprint = model.fingerprint()
    if quantization != "none":
        data = _quantize_int8(data)
        fingerprint = _quantized_fingerprint(fingerprint, quantization)
    return _set_metadata(data, _metadata(model, quantization, fingerprint))


def _name(model: bytes | str | Path) -> str:
    return "<in-memory ONNX model>" if isinstance(model, bytes) else str(model)


class OnnxBackbone(nn.Module):
    """An onnxruntime session standing in for a backbone: CPU tensor in, CPU tensor out.

    onnxruntime sessions are safe to call from several threads at once."""

    def __init__(self, model: bytes | str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning: spinning ones held the cores the
        # detector's torch threads needed next (BlazeFace pipeline at batch 1, two threads:
        # 14.5 against 6.4 ms per face, docs/detectors.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = str(model) if isinstance(model, Path) else model
        try:
            self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise OnnxError(f"{_name(model)}: not a loadable ONNX model ({exc})") from exc
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(x.detach().cpu().float().numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: inputs})[0])


class OnnxFaceModel(FaceModel):
    """A `FaceModel` whose backbone is an onnxruntime session (see `load_onnx`)."""

    backbone: OnnxBackbone

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.metadata[f"{KEY}embedding_dim"])

    def for_inference(self) -> OnnxFaceModel:
        """Already an inference runtime (TorchScript cannot trace onnxruntime): itself."""
        return self


def load_onnx(model: bytes | str | Path, threads: int | None = None) -> OnnxFaceModel:
    """A model that embeds with onnxruntime, with the preprocessing stored in the file."""
    backbone = OnnxBackbone(model, threads)
    meta = backbone.metadata
    version = meta.get(f"{KEY}format_version")
    if version is None:
        raise OnnxError(f"{_name(model)}: no facelab metadata (export it with `facelab export`)")
    if int(version) > FORMAT_VERSION:
        raise OnnxError(
            f"{_name(model)}: facelab ONNX format {version} is newer than this facelab "
            f"supports ({FORMAT_VERSION}); upgrade facelab"
        )
    desc = json.loads(meta[f"{KEY}model"])
    preprocess = Preprocess.from_dict(desc["preprocess"])
    # The operating points were measured with the float weights, not an int8 copy's.
    exact = meta.get(f"{KEY}quantization", "none") == "none"
    return OnnxFaceModel(
        backbone,
        preprocess,
        desc["name"],
        desc["kwargs"],
        meta[f"{KEY}fingerprint"],
        operating_points(desc.get("operating_points")) if exact else (),
    ).eval()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.einsum("ij,ij->i", a, b)


def export_onnx(
    model: FaceModel,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    quantization: str = "none",
    seed: int = 0,
) -> ExportReport:
    """Export to `out` (written atomically) after checking that onnxruntime reproduces the
    PyTorch features of a random batch of 3 (another batch size than the export's)."""
    data = onnx_bytes(model, opset, quantization)
    size = model.preprocess.size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model.backbone(x).numpy()
    runner = OnnxBackbone(data)
    got = runner(x).numpy()
    cosine = float(_cosines(expected, got).min())
    if quantization == "none" and cosine < MIN_COSINE:
        raise OnnxError(f"{model.name}: ONNX features differ from PyTorch (cosine {cosine:.6f})")
    atomic_write(out, lambda fh: fh.write(data))
    report = ExportReport(
        str(out),
        len(data),
        quantization,
        runner.metadata[f"{KEY}fingerprint"],
        float(np.abs(expected - got).max()),
        cosine,
    )
    log.info(
        "%s: %s (%d bytes, %s), max |diff| %.3g, min cosine %.6f vs PyTorch",
        out,
        model.name,
        report.bytes,
        quantization,
        report.max_abs_diff,
        report.min_cosine,
    )
    return report
