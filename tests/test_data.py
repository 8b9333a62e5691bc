from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_folder

from facelab.data import (
    IdentityFolder,
    ImageError,
    read_image,
    read_lfw_pairs,
    read_trial_csv,
    read_trials,
    split_identities,
    split_images,
)
from facelab.data.augment import Augment, cutmix
from facelab.data.faces import load_faces
from facelab.models.preprocess import Preprocess


def test_identity_folder_filter_and_split(tmp_path: Path) -> None:
    root = write_synthetic_folder(tmp_path / "ids", people=4, per_person=5)
    (root / "loner").mkdir()
    (root / "loner" / "x.jpg").write_bytes((root / "person_0" / "person_0_0000.jpg").read_bytes())
    folder = IdentityFolder.scan(root, min_images=2)
    assert "loner" not in folder.identities and folder.num_classes == 4 and len(folder) == 20
    train, val = split_images(folder.samples, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert {s.label for s in val} == {0, 1, 2, 3}
    again = split_images(list(reversed(folder.samples)), 0.2, seed=1)
    assert sorted(s.path for s in again[1]) == sorted(s.path for s in val)
    assert sorted(s.path for s in split_images(folder.samples, 0.2, seed=2)[1]) != sorted(
        s.path for s in val
    )
    kept, held = split_identities([f"p{i}" for i in range(100)], 0.3, seed=0)
    assert not set(kept) & set(held) and len(kept) + len(held) == 100 and 15 < len(held) < 45
    with pytest.raises(ValueError, match="no identity folder"):
        IdentityFolder.scan(root, min_images=50)


def test_lfw_pairs_parse_and_resolve(lfw: Path) -> None:
    view2 = read_lfw_pairs(lfw / "pairs.txt")
    assert len(view2) == 6000
    assert [sum(t.fold == f for t in view2) for f in range(10)] == [600] * 10
    assert sum(t.label for t in view2) == 3000
    first = view2[0]
    assert first.a.name == "Abel_Pacheco_0001.jpg" and first.b.name == "Abel_Pacheco_0004.jpg"
    assert first.label == 1 and view2[300].label == 0
    for name in ("pairsDevTrain.txt", "pairsDevTest.txt"):
        dev = read_trials(lfw / name)
        assert len(dev) in (2200, 1000) and all(t.fold is None for t in dev)
        view2 += dev
    missing = [p for t in view2 for p in (t.a, t.b) if not p.is_file()]
    assert missing == []


def test_trial_csv_formats(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("img1,img2,label\na.jpg,b.jpg,1\nc.jpg,d.jpg,0\n")
    trials = read_trials(tmp_path / "t.csv")
    assert [(t.a.name, t.b.name, t.label) for t in trials] == [
        ("a.jpg", "b.jpg", 1),
        ("c.jpg", "d.jpg", 0),
    ]
    (tmp_path / "u.csv").write_text("img1,img2\nx/a.jpg,x/b.jpg\n")
    unlabelled = read_trial_csv(tmp_path / "u.csv", images_root="/data")
    assert unlabelled[0].label is None and unlabelled[0].a == Path("/data/x/a.jpg")
    (tmp_path / "v.txt").write_text("a.jpg b.jpg\nc.jpg d.jpg\n")
    assert len(read_trials(tmp_path / "v.txt")) == 2
    (tmp_path / "bad.csv").write_text("a.jpg,b.jpg,maybe\n")
    with pytest.raises(ValueError, match="bad.csv:1"):
        read_trials(tmp_path / "bad.csv")


def test_bad_images_name_the_file(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="corrupt.jpg"):
        read_image(corrupt)
    with pytest.raises(ImageError, match="missing.jpg: file not found"):
        read_image(tmp_path / "missing.jpg")


def test_lfw_centre_crop_preprocessing(lfw: Path) -> None:
    image = read_image(lfw / "images" / "Tony_Blair" / "Tony_Blair_0001.jpg")
    spec = Preprocess(size=112, crop=0.6)
    face = spec.crop_face(image)
    assert face.shape == (112, 112, 3) and face.dtype == np.uint8
    x = spec.to_tensor(image)
    assert x.shape == (3, 112, 112) and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    bgr = Preprocess(size=112, crop=0.6, colour="BGR").to_tensor(image)
    assert torch.equal(bgr, x.flip(0))


def test_face_cache_reused(tmp_path: Path) -> None:
    root = write_synthetic_folder(tmp_path / "ids", people=2, per_person=2)
    paths = sorted(root.rglob("*.jpg"))
    spec = Preprocess(size=16, crop=1.0)
    first = load_faces(
        paths, spec.crop_face, 16, spec.fingerprint(), tmp_path / "cache", progress=False
    )
    assert isinstance(first, np.memmap) and first.shape == (4, 16, 16, 3)

    def no_decoding(image: np.ndarray) -> np.ndarray:
        raise AssertionError("an image was cropped again despite the cache")

    second = load_faces(
        paths, no_decoding, 16, spec.fingerprint(), tmp_path / "cache", progress=False
    )
    assert np.array_equal(first, second) and len(list((tmp_path / "cache").glob("*.npy"))) == 1
    # another cropping (key) is never served from that cache
    other = Preprocess(size=16, crop=0.5)
    third = load_faces(
        paths, other.crop_face, 16, other.fingerprint(), tmp_path / "cache", progress=False
    )
    assert not np.array_equal(third, first) and len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_augment_and_cutmix_shapes() -> None:
    torch.manual_seed(0)
    faces = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    out = Augment(rotate=10, erase=1.0)(faces)
    assert out.shape == (8, 32, 32, 3) and 0 <= float(out.min()) and float(out.max()) <= 255
    assert not torch.equal(out, faces.float())
    plain = Augment(flip=False, crop_scale=(1.0, 1.0), jitter=0.0)(faces)
    assert torch.equal(plain, faces.float())


@pytest.mark.parametrize("alpha", [0.2, 1.0, 5.0])
def test_cutmix_ratio_is_the_kept_area(alpha: float) -> None:
    """lam is the fraction of each image left in place; the rest is one box from its partner."""
    n, h, w = 6, 16, 20
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()
    boxes = 0
    for _ in range(30):
        mixed, y, partner, lam = cutmix(x, torch.arange(n), alpha)
        assert mixed.shape == x.shape and torch.equal(y, torch.arange(n))
        assert sorted(partner.tolist()) == list(range(n))  # a permutation of the batch
        for i in range(n):
            pasted = mixed[i, 0] != i
            assert torch.all(mixed[i][:, pasted] == partner[i])  # all of it from the partner
            if partner[i] == i:
                continue  # its own pixels pasted back: no visible box
            assert 1 - pasted.float().mean().item() == pytest.approx(lam)
            rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
            if len(rows):  # one rectangle: its bounding box is all pasted
                boxes += 1
                box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
                assert box.all()
    assert boxes > 0
