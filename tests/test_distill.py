"""Knowledge distillation: the embedding loss, the teacher-embedding cache, a tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_synthetic_folder

import facelab.train.batches as batches
import facelab.train.distill as distill
import facelab.train.loop as loop
from facelab.data.folders import Sample
from facelab.models.backbones.dlib_resnet import DLIB_PREPROCESS
from facelab.models.checkpoint import save_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import Preprocess, resized
from facelab.train import TrainConfig, Trainer, train
from facelab.train.distill import (
    Distillation,
    OnlineTeacher,
    cached_embeddings,
    centred,
    distillation,
    distillation_loss,
    teacher_targets,
)
from facelab.train.losses import build_criterion
from facelab.train.transfer import training_preprocess

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_model(dim: int = 8, seed: int = 0) -> FaceModel:
    torch.manual_seed(seed)
    return FaceModel.create("shufflenetv2", embedding_dim=dim, input_size=32, width=0.5).eval()


def tiny_config(data: Path, out: Path, **options: object) -> TrainConfig:
    """One epoch of `tiny_model`'s network on a synthetic identity folder."""
    return TrainConfig(
        data=str(data),
        out=str(out),
        backbone="shufflenetv2",
        backbone_options={"width": 0.5},
        embedding_dim=8,
        image_size=32,
        batch_size=4,
        epochs=1,
        workers=1,
        **options,
    )


def test_cosine_loss_sees_only_directions() -> None:
    teacher = F.normalize(torch.randn(5, 8), dim=1)
    assert distillation_loss(3.0 * teacher, teacher, "cosine").item() == pytest.approx(0, abs=1e-6)
    assert distillation_loss(-teacher, teacher, "cosine").item() == pytest.approx(2, abs=1e-6)
    student = torch.randn(5, 8, requires_grad=True)
    distillation_loss(student, teacher, "cosine").backward()
    # scaling the student changes nothing, so the gradient has no radial component
    radial = (student.grad * student.detach()).sum(1)
    assert torch.allclose(radial, torch.zeros(5), atol=1e-6)


def test_mse_loss_matches_cosine_on_unit_vectors_and_pulls_the_norm() -> None:
    teacher = F.normalize(torch.randn(6, 8), dim=1)
    student = F.normalize(torch.randn(6, 8), dim=1)
    mse = distillation_loss(student, teacher, "mse")
    assert mse.item() == pytest.approx(2 * distillation_loss(student, teacher, "cosine").item())
    assert distillation_loss(2 * teacher, teacher, "mse").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distill_loss"):
        distillation_loss(student, teacher, "l1")


def test_criterion_looks_up_targets_by_sample_index() -> None:
    targets = F.normalize(torch.randn(10, 8), dim=1)
    labels = torch.arange(10) % 3
    plain = Distillation(targets, labels, "cosine", build_criterion("softmax", 8, 3), 0.0)
    assert plain.head is None and plain.margin is None
    index = torch.tensor([7, 2, 2, 5])
    assert plain(4.0 * targets[index], index).item() == pytest.approx(0, abs=1e-6)
    assert plain(targets[index.flip(0)], index).item() > 0.1
    # an online teacher's targets for the batch replace the cached ones
    assert plain(targets[index.flip(0)], index, targets[index.flip(0)]).item() < 1e-6
    assert plain.state_dict() == {}  # targets come back from the cache, not the checkpoint

    with_ids = Distillation(targets, labels, "cosine", build_criterion("softmax", 8, 3), 0.5)
    assert with_ids.head is not None
    features = targets[index]
    expected = 0.5 * F.cross_entropy(with_ids.head(features), labels[index])
    assert with_ids(features, index).item() == pytest.approx(expected.item(), rel=1e-5)


def test_embeddings_are_cached_per_model_and_image_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_synthetic_folder(tmp_path / "ids", people=2, per_person=3, size=40)
    paths = sorted(root.rglob("*.jpg"))
    teacher = tiny_model()
    cache = tmp_path / "cache"
    first = cached_embeddings(teacher, paths, cache, workers=1)
    assert first.shape == (6, 8)
    assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    assert len(list(cache.glob("embeddings-*.npz"))) == 1

    def no_recompute(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher ran again despite the cache")

    monkeypatch.setattr(distill, "embed_images", no_recompute)
    assert np.array_equal(cached_embeddings(teacher, paths, cache), first)
    monkeypatch.undo()

    other_images = cached_embeddings(teacher, paths[::-1], cache, workers=1)
    assert np.allclose(other_images, first[::-1], atol=1e-5)
    other_weights = cached_embeddings(tiny_model(seed=1), paths, cache, workers=1)
    assert not np.allclose(other_weights, first)
    assert len(list(cache.glob("embeddings-*.npz"))) == 3


def test_centred_targets_drop_the_shared_direction() -> None:
    rng = np.random.default_rng(0)
    shared = np.ones(8, np.float32)
    raw = shared + 0.3 * rng.standard_normal((50, 8)).astype(np.float32)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    assert (raw @ raw.T).mean() > 0.8  # every face looks alike to the raw cosine
    targets = centred(raw, raw.mean(0))
    assert np.allclose(np.linalg.norm(targets, axis=1), 1, atol=1e-6)
    assert abs((targets @ targets.T).mean()) < 0.05
    assert np.allclose(centred(raw, np.zeros(8, np.float32)), raw, atol=1e-6)


def test_teacher_targets_centre_on_the_training_mean(tmp_path: Path) -> None:
    root = write_synthetic_folder(tmp_path / "ids", people=2, per_person=2, size=40)
    samples = [Sample(p, 0) for p in sorted(root.rglob("*.jpg"))]
    teacher = tiny_model()
    cfg = TrainConfig(cache_dir=str(tmp_path / "cache"), workers=1)
    targets, mean = teacher_targets(cfg, teacher, samples)
    raw = cached_embeddings(teacher, [s.path for s in samples], cfg.cache_dir)
    assert np.allclose(mean, raw.mean(0)) and np.allclose(targets, centred(raw, mean))
    cfg.centre_targets = False
    targets, mean = teacher_targets(cfg, teacher, samples)
    assert not mean.any() and np.allclose(targets, raw, atol=1e-6)


def test_a_tiny_distillation_run(tmp_path: Path) -> None:
    """Cached targets: the teacher crops its faces otherwise than the student."""
    data = write_synthetic_folder(tmp_path / "ids", people=3, per_person=4, size=40)
    teacher = FaceModel.create(
        "shufflenetv2", Preprocess(crop=0.5), embedding_dim=8, input_size=32, width=0.5
    )
    teacher_file = save_checkpoint(tmp_path / "teacher.pt", teacher)
    cfg = tiny_config(
        data,
        tmp_path / "run",
        lr=0.05,
        val_fraction=0.0,
        min_images=1,
        include_people=[],
        teacher=str(teacher_file),
        identity_weight=0.1,
        cache_dir=str(tmp_path / "cache"),
    )
    result = train(cfg)
    assert [r["epoch"] for r in result.history] == [1]
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert len(list((tmp_path / "cache").glob("embeddings-*.npz"))) == 1

    with pytest.raises(ValueError, match="embedding_dim: 8"):
        train(TrainConfig(**{**cfg.to_dict(), "embedding_dim": 16, "out": str(tmp_path / "b")}))


def test_include_people_keeps_only_the_listed_identities(tmp_path: Path) -> None:
    data = write_synthetic_folder(tmp_path / "ids", people=3, per_person=4, size=40)
    people = tmp_path / "people.txt"
    people.write_text("2\nperson_0\t4\nperson_2\t4\n")
    cfg = tiny_config(data, tmp_path / "run", include_people=[str(people)])
    assert Trainer(cfg).classes == ["person_0", "person_2"]


def test_online_teacher_is_frozen_and_centred() -> None:
    model = tiny_model()
    mean = 0.5 * F.normalize(torch.randn(8), dim=0)
    teacher = OnlineTeacher(model.backbone, mean, student_size=24)
    teacher.train()
    assert not teacher.training and not teacher.backbone.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = centred(F.normalize(model.backbone(x), dim=1).numpy(), mean.numpy())
    assert np.allclose(teacher(x).numpy(), expected, atol=1e-5)
    assert teacher.student_view(x).shape == (3, 3, 24, 24)
    flat = torch.full((1, 3, 32, 32), 0.25)  # resizing keeps a flat face flat
    assert torch.allclose(teacher.student_view(flat), torch.full((1, 3, 24, 24), 0.25))


def test_resized_preprocessing_scales_the_template() -> None:
    spec = DLIB_PREPROCESS
    small = resized(spec, 75)
    assert small.size == 75 and small.mean == spec.mean and small.alignment == spec.alignment
    assert np.allclose(np.array(small.template) * 2, np.array(spec.template))
    assert np.allclose(resized(small, 150).template, spec.template)
    cfg = TrainConfig(teacher="dlib_resnet", alignment="teacher", image_size=112)
    assert training_preprocess(cfg) == resized(spec, 112)
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainConfig(alignment="teacher")


def test_the_teacher_runs_online_only_for_a_student_with_its_preprocessing(
    tmp_path: Path,
) -> None:
    root = write_synthetic_folder(tmp_path / "ids", people=2, per_person=2, size=40)
    samples = [Sample(p, 0) for p in sorted(root.rglob("*.jpg"))]
    teacher_file = save_checkpoint(tmp_path / "teacher.pt", tiny_model())
    cfg = TrainConfig(teacher=str(teacher_file), cache_dir=str(tmp_path / "cache"), workers=1)
    identity = build_criterion("softmax", 8, 1)
    cpu = torch.device("cpu")
    _, index, online = distillation(cfg, identity, samples, tiny_model(seed=1), cpu)
    assert isinstance(online, OnlineTeacher) and index.tolist() == [0, 1, 2, 3]
    other = FaceModel.create(
        "shufflenetv2", Preprocess(crop=0.5), embedding_dim=8, input_size=32, width=0.5
    )
    assert distillation(cfg, identity, samples, other, cpu)[2] is None  # another crop
    larger = FaceModel.create(
        "shufflenetv2",
        resized(tiny_model().preprocess, 48),
        embedding_dim=8,
        input_size=48,
        width=0.5,
    )
    online = distillation(cfg, identity, samples, larger, cpu)[2]
    assert online is not None and online.student_size == 48


def test_online_targets_follow_every_augmentation(tmp_path: Path) -> None:
    """A student that starts as its teacher (dlib_resnet: no batch-norm, so training and
    evaluation modes agree) has nothing to learn when the teacher embeds the very batches it
    sees, however hard they are cropped, rotated, recoloured and cut-mixed."""
    data = write_synthetic_folder(tmp_path / "ids", people=2, per_person=3, size=40)
    torch.manual_seed(0)
    teacher = FaceModel.create("dlib_resnet")
    teacher_file = save_checkpoint(tmp_path / "teacher.pt", teacher)
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        init_from=str(teacher_file),
        teacher=str(teacher_file),
        centre_targets=False,
        embedding_dim=128,
        min_images=1,
        val_fraction=0.0,
        batch_size=3,
        epochs=1,
        lr=0.0,
        augment={"crop_scale": [0.5, 1.0], "rotate": 15, "jitter": 0.4},
        cutmix=1.0,
        workers=1,
        cache_dir=str(tmp_path / "cache"),
    )
    result = train(cfg)
    assert result.history[-1]["train_loss"] < 1e-5


def test_an_online_run_decodes_its_training_faces_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a face cache, the teacher's targets reuse the faces training decoded."""
    decoded: list[int] = []

    def counting(paths: list[Path], spec: Preprocess, *args: object, **kwargs: object) -> object:
        decoded.append(len(paths))
        return batches.decode_faces(paths, spec, *args, **kwargs)

    monkeypatch.setattr(loop, "decode_faces", counting)
    monkeypatch.setattr(distill, "decode_faces", counting)
    data = write_synthetic_folder(tmp_path / "ids", people=2, per_person=2, size=40)
    teacher_file = save_checkpoint(tmp_path / "teacher.pt", tiny_model())
    cfg = tiny_config(
        data,
        tmp_path / "run",
        init_from=str(teacher_file),
        teacher=str(teacher_file),
        min_images=1,
        val_fraction=0.0,
    )
    trainer = Trainer(cfg)
    assert trainer.net.teacher is not None and decoded == [4]


def test_validation_reads_the_read_only_face_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cached faces are a read-only memory map; `Preprocess.normalise` copies them rather than
    hand torch an array it cannot own. torch warns about such an array once per process only,
    so whatever ran before, every array handed to `torch.from_numpy` is checked here."""
    handed: list[bool] = []
    from_numpy = torch.from_numpy

    def checked(array: np.ndarray) -> torch.Tensor:
        handed.append(array.flags.writeable)
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", checked)
    data = write_synthetic_folder(tmp_path / "ids", people=3, per_person=4, size=40)
    cfg = tiny_config(data, tmp_path / "run", val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    result = train(cfg)
    assert len(list((tmp_path / "c").glob("faces-*.npy"))) == 2  # training and validation faces
    assert 0.0 <= result.history[-1]["val_top1"] <= 1.0
    assert handed and all(handed), f"{handed.count(False)} of {len(handed)} arrays read-only"
