"""Hostile and unlucky inputs (issue 21): model files that would run code, damaged checkpoints,
cross-site requests, costly uploads, wrong keys, a busy gallery and a crash mid-enrollment.
Each test failed before its fix; all run in seconds."""

from __future__ import annotations

import argparse
import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving import tiny_model

import facelab
from facelab import api
from facelab.cli import _model_source, main
from facelab.gallery import GalleryStore, enroll
from facelab.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Payload:
    """A pickle that, when unpickled with weights_only=False, creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def hostile_pickle(path: Path, marker: Path) -> Path:
    torch.save({"kind": "facelab-checkpoint", "schema": 1, "model": Payload(marker)}, path)
    return path


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran"


def face_png(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# -- 1. loading a model never runs code; checkpoints carry a checksum ---------------------------


def test_a_pickle_named_like_a_model_in_the_cwd_is_never_read(
    tmp_path: Path, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    hostile_pickle(tmp_path / "dlib_resnet", marker)
    assert facelab.load_model("dlib_resnet").name == "dlib_resnet"
    assert _model_source(argparse.Namespace(model="dlib_resnet")) == "dlib_resnet"
    assert not marker.exists()


def test_a_pickle_as_a_checkpoint_path_is_refused(tmp_path: Path, marker: Path) -> None:
    evil = hostile_pickle(tmp_path / "model.pt", marker)
    with pytest.raises(CheckpointError, match=r"model\.pt: refused: .*posix\.system"):
        facelab.load_model(evil)
    image = face_png(tmp_path / "a.png")
    assert main(["verify", str(evil), str(image), str(image)]) == 2
    assert main(["eval", str(evil), str(image)]) == 2
    assert not marker.exists()


def test_a_gallery_naming_a_pickle_as_its_model_never_runs_it(tmp_path: Path, marker: Path) -> None:
    gallery = tmp_path / "g.db"
    image = face_png(tmp_path / "a.png")
    enroll(gallery, tiny_model(), "ada", [image], progress=False)
    with GalleryStore(gallery) as store:
        store.set_model_source(str(hostile_pickle(tmp_path / "source.pt", marker)))
    assert main(["identify", "--gallery", str(gallery), str(image)]) == 2
    assert main(["enroll", "--gallery", str(gallery), "--name", "bob", str(image)]) == 2
    assert not marker.exists()


def flip_bits(path: Path, region: bytes, bits: int, seed: int = 0) -> None:
    """Flip `bits` random bits inside the first occurrence of `region` in the file."""
    raw = bytearray(path.read_bytes())
    start = raw.find(region)
    assert start >= 0
    rng = random.Random(seed)
    for offset in rng.sample(range(len(region) * 8), bits):
        raw[start + offset // 8] ^= 1 << (offset % 8)
    path.write_bytes(bytes(raw))


def test_flipped_bits_in_the_weights_are_a_named_error(tmp_path: Path) -> None:
    model = tiny_model()
    path = save_checkpoint(tmp_path / "tiny.pt", model)
    weights = max(model.backbone.state_dict().values(), key=lambda t: t.numel())
    flip_bits(path, weights.numpy().tobytes(), bits=20)
    with pytest.raises(CheckpointError, match=r"tiny\.pt: checksum mismatch"):
        load_checkpoint(path)


def test_training_state_round_trips_as_plain_types(tmp_path: Path) -> None:
    """What the trainer saves (NumPy RNG state, NumPy numbers in the history, optimizer state)
    loads under weights_only and restores the same random streams."""
    from facelab.train.loop import rng_state, set_rng_state

    model = tiny_model()
    optimizer = torch.optim.SGD(model.backbone.parameters(), lr=0.1, momentum=0.9)
    model.backbone(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = save_checkpoint(
        tmp_path / "run.pt",
        model,
        rng=state,
        optimizer=optimizer.state_dict(),
        history=[{"epoch": np.int64(1), "auc": np.float64(0.9)}],
    )
    payload = load_checkpoint(path)
    assert payload["history"] == [{"epoch": 1, "auc": 0.9}]
    set_rng_state(payload["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    optimizer.load_state_dict(payload["optimizer"])


def test_an_older_checkpoint_with_numpy_state_still_loads(tmp_path: Path) -> None:
    """Written before checksums and plain types (torch.save of NumPy objects): readable, safe."""
    model = tiny_model()
    old = {
        "kind": "facelab-checkpoint",
        "schema": 1,
        "model": model.describe(),
        "model_state": model.backbone.state_dict(),
        "rng": {"numpy": np.random.get_state()},
        "history": [{"auc": np.float64(0.5)}],
    }
    torch.save(old, tmp_path / "old.pt")
    assert api.load_model(tmp_path / "old.pt").fingerprint() == model.fingerprint()
