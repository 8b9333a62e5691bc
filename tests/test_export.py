"""ONNX export: every backbone with a dynamic batch axis, the preprocessing in the file's
metadata, onnxruntime behind the FaceModel interface (API and CLI), int8 quantisation."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from serving import KEYS, READ, png, tiny_model, upload

from facelab import load_model
from facelab.cli import main
from facelab.data.images import decode_image
from facelab.gallery import GalleryError, GalleryStore, ModelInfo, enroll
from facelab.models.checkpoint import save_checkpoint
from facelab.models.export import KEY, OnnxError, export_onnx, load_onnx
from facelab.models.face_model import FaceModel
from facelab.models.registry import BACKBONES
from facelab.serve import ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_exports(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    # dlib_resnet's shape is fixed (150x150 -> 128); the others are built tiny
    options = {} if name.startswith("dlib_resnet") else {"embedding_dim": 32, "input_size": 32}
    if "width" in inspect.signature(BACKBONES.get(name).constructor).parameters:
        options["width"] = 0.5
    model = FaceModel.create(name, **options).eval()
    report = export_onnx(model, tmp_path / f"{name}.onnx")
    assert report.min_cosine > 0.9999
    runtime = load_onnx(tmp_path / f"{name}.onnx")
    assert runtime.preprocess == model.preprocess
    assert (runtime.name, runtime.fingerprint()) == (name, model.fingerprint())
    assert runtime.embedding_dim == model.embedding_dim
    size = model.preprocess.size
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, 3, size, size)
        np.testing.assert_allclose(
            runtime.embed_tensors(x), model.embed_tensors(x), atol=2e-5, rtol=1e-4
        )


def test_metadata_carries_the_preprocessing(tmp_path: Path) -> None:
    model = tiny_model()
    export_onnx(model, tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[f"{KEY}model"])["preprocess"] == json.loads(
        json.dumps(model.preprocess.to_dict())
    )
    assert props[f"{KEY}fingerprint"] == model.fingerprint()
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][0] == "batch"
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "bare.onnx")
    with pytest.raises(OnnxError, match="no facelab metadata"):
        load_onnx(tmp_path / "bare.onnx")
    with pytest.raises(OnnxError, match="not a loadable ONNX model"):
        load_onnx(b"not onnx")
    with pytest.raises(ValueError, match="runtime 'onnx'"):
        load_model(tmp_path / "m.onnx", runtime="torch")


def test_idle_onnxruntime_threads_sleep(tmp_path: Path) -> None:
    """Between calls onnxruntime's worker threads sleep instead of spinning: spinning ones held
    the cores the detector's torch threads needed next (the BlazeFace pipeline with the
    embedding in onnxruntime took 14.5 instead of 6.4 ms per face at batch 1 on two cores)."""
    export_onnx(tiny_model(), tmp_path / "m.onnx")
    session = load_onnx(tmp_path / "m.onnx", threads=2).backbone.session
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_int8_has_its_own_fingerprint(tmp_path: Path) -> None:
    model = tiny_model()
    faces = [
        np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(3)
    ]
    float_report = export_onnx(model, tmp_path / "f.onnx")
    int8_report = export_onnx(model, tmp_path / "q.onnx", quantization="int8")
    assert int8_report.bytes < float_report.bytes / 2
    assert int8_report.fingerprint != float_report.fingerprint == model.fingerprint()
    gallery = tmp_path / "g.db"
    enroll(gallery, model, "Ada", faces[:2], progress=False)
    with GalleryStore(gallery) as store:
        store.check_model(ModelInfo.of(load_onnx(tmp_path / "f.onnx")))  # same embeddings
        with pytest.raises(GalleryError, match="gallery was built with"):
            store.check_model(ModelInfo.of(load_onnx(tmp_path / "q.onnx")))
    q = load_onnx(tmp_path / "q.onnx").embed_faces(faces)
    assert np.einsum("ij,ij->i", q, model.embed_faces(faces)).min() > 0.9


def test_cli_export_and_embed_with_onnxruntime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model()
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", model)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["min_cosine"] > 0.9999
    runs = {
        "torch": ["--model", str(checkpoint), "--eager"],
        "onnx_file": ["--model", str(out)],
        "onnx_runtime": ["--model", str(checkpoint), "--runtime", "onnx"],
    }
    embeddings = {}
    for name, args in runs.items():
        npz = tmp_path / f"{name}.npz"
        assert main(["embed", str(images), "--out", str(npz), *args]) == 0
        with np.load(npz) as data:
            embeddings[name] = data["embeddings"]
            assert str(data["fingerprint"]) == model.fingerprint()
    np.testing.assert_allclose(embeddings["onnx_file"], embeddings["torch"], atol=1e-5)
    np.testing.assert_allclose(embeddings["onnx_runtime"], embeddings["torch"], atol=1e-5)


def test_server_embeds_with_onnxruntime(tmp_path: Path) -> None:
    model = tiny_model()
    export_onnx(model, tmp_path / "m.onnx")
    app = create_app(load_model(tmp_path / "m.onnx"), ServeConfig(tmp_path / "g.db", KEYS))
    with TestClient(app) as client:
        assert client.get("/v1/info", headers=READ).json()["runtime"] == "onnx"
        r = client.post("/v1/embed", files=[upload("image", png(0))], headers=READ).json()
    expected = model.embed_faces([decode_image(png(0))])
    np.testing.assert_allclose(r["faces"][0]["embedding"], expected[0], atol=1e-5)
