"""Batch plans (shuffled, P x K, DDP shards), transfer learning with frozen blocks, triplet runs
with exact resume, five-point aligned training faces, and the Inception backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_folder

from facelab.models import BACKBONES, FaceModel
from facelab.models.checkpoint import load_checkpoint
from facelab.train import TrainConfig, train
from facelab.train.distributed import Distributed, shard
from facelab.train.sampler import IdentityBatches, ShuffledBatches
from facelab.train.transfer import backbone_blocks, freeze_all_but_last

QUIET = {"flip": True, "crop_scale": (0.9, 1.0), "jitter": 0.1}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_shuffled_batches_depend_only_on_seed_and_epoch() -> None:
    plan = ShuffledBatches(num_samples=10, batch_size=4, seed=1)
    first = plan.epoch(0)
    assert len(plan) == len(first) == 2 and all(len(b) == 4 for b in first)
    assert len(set(torch.cat(first).tolist())) == 8  # no repeats; the last partial batch dropped
    again = ShuffledBatches(10, 4, seed=1).epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, plan.epoch(1), strict=True))


def test_identity_batches_hold_p_identities_of_k_images() -> None:
    labels = [0] * 5 + [1] * 3 + [2] * 1 + [3] * 2 + [4] * 6  # identity 2 has no positive
    plan = IdentityBatches(labels, identities_per_batch=2, images_per_identity=4, seed=0)
    batches = plan.epoch(0) + plan.epoch(1)
    assert len(plan) == len(labels) // 8
    for batch in batches:
        ids = [labels[i] for i in batch.tolist()]
        assert len(batch) == 8 and 2 not in ids
        groups = [ids[:4], ids[4:]]
        assert all(len(set(g)) == 1 for g in groups) and groups[0][0] != groups[1][0]
        for group, idx in zip(groups, (batch[:4], batch[4:]), strict=True):
            available = labels.count(group[0])
            assert len(set(idx.tolist())) == min(4, available)  # distinct images first
    assert all(torch.equal(a, b) for a, b in zip(plan.epoch(3), plan.epoch(3), strict=True))
    with pytest.raises(ValueError, match="identities with two or more"):
        IdentityBatches([0, 0, 1], identities_per_batch=2, images_per_identity=2)


def test_ddp_shards_tile_the_global_batch() -> None:
    batch = torch.arange(12)
    parts = [shard(batch, Distributed(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(parts), batch) and all(len(p) == 4 for p in parts)
    assert torch.equal(shard(batch, Distributed()), batch)


def test_config_rejects_triplets_without_positives() -> None:
    with pytest.raises(ValueError, match="images_per_identity"):
        TrainConfig(loss="triplet-batch-hard")
    with pytest.raises(ValueError, match="multiple"):
        TrainConfig(loss="triplet-batch-hard", batch_size=10, images_per_identity=4)


def test_blocks_follow_forward_order_and_freezing_stops_gradients() -> None:
    net = BACKBONES.create("resnet18", embedding_dim=16, input_size=32, width=0.25)
    blocks = backbone_blocks(net)
    assert len(blocks) == 1 + 8 + 1  # stem, 4 stages x 2 residual blocks, embedding
    assert blocks[0] is net.stem and blocks[-1] is net.embedding
    frozen = freeze_all_but_last(net, 2)
    assert len(frozen) == 8
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    for block in blocks:
        if block in frozen:
            assert all(not p.requires_grad and p.grad is None for p in block.parameters())
        else:
            assert all(p.grad is not None for p in block.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="10 blocks"):
        freeze_all_but_last(net, 11)


def write_pairs(root: Path, path: Path) -> Path:
    people = sorted(root.iterdir())
    lines = []
    for i, person in enumerate(people):
        imgs = sorted(person.iterdir())
        other = sorted(people[(i + 1) % len(people)].iterdir())
        lines += [f"{imgs[0]},{imgs[1]},1", f"{imgs[0]},{other[0]},0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny(data: Path, out: Path, **options) -> TrainConfig:
    base = {
        "data": str(data),
        "out": str(out),
        "backbone": "resnet18",
        "backbone_options": {"width": 0.25},
        "embedding_dim": 16,
        "image_size": 32,
        "batch_size": 8,
        "epochs": 1,
        "lr": 0.05,
        "scheduler": "constant",  # resuming with more epochs must not change the schedule
        "val_fraction": 0.0,
        "augment": QUIET,
        "workers": 1,
    }
    return TrainConfig(**{**base, **options})


def test_fine_tune_from_a_checkpoint_trains_only_the_last_blocks(tmp_path: Path) -> None:
    source = write_synthetic_folder(tmp_path / "source", people=3, per_person=4, size=32)
    target = write_synthetic_folder(tmp_path / "target", people=4, per_person=4, size=32)
    pairs = write_pairs(target, tmp_path / "pairs.csv")
    pretrained = train(tiny(source, tmp_path / "pre"))
    tuned = train(
        tiny(
            target,
            tmp_path / "tuned",
            init_from=str(pretrained.checkpoint),
            trainable_blocks=1,
            loss="cosface",
            val_trials=str(pairs),
        )
    )
    assert [r["epoch"] for r in tuned.history] == [0, 1]  # epoch 0: before fine-tuning
    assert 0 <= tuned.history[0]["val_auc"] <= 1
    before = load_checkpoint(pretrained.checkpoint)
    after = load_checkpoint(tuned.checkpoint)
    assert after["head"]["classes"] == sorted(p.name for p in target.iterdir())
    for key, value in before["model_state"].items():
        if key == "embedding.bn.weight":  # IResNet keeps this scale at 1 by design
            continue
        same = torch.equal(value, after["model_state"][key])
        assert same != key.startswith("embedding."), key  # frozen stay, the last block moves


def test_triplet_run_resumes_exactly(tmp_path: Path) -> None:
    data = write_synthetic_folder(tmp_path / "ids", people=4, per_person=4, size=32)
    options = {
        "loss": "triplet-semi-hard",
        "images_per_identity": 2,
        "center_loss": 0.1,
        "loader_workers": 1,
    }
    straight = train(tiny(data, tmp_path / "a", epochs=2, **options))
    train(tiny(data, tmp_path / "b", epochs=1, **options))
    resumed = train(tiny(data, tmp_path / "b", epochs=2), resume=tmp_path / "b" / "last.pt")
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["head"] is None and "centers" in "".join(a["criterion_state"])
    for part in ("model_state", "criterion_state"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{key} differs after resume"


def test_inception_embeds_96_and_thumbnail_inputs() -> None:
    model = FaceModel.create("inception")
    assert model.preprocess.size == 96 and model.embedding_dim == 128
    params = sum(p.numel() for p in model.parameters())
    assert 3.5e6 < params < 4e6  # OpenFace's nn4.small2: 3.7M
    for size in (32, 64, 112):
        net = BACKBONES.create("inception", embedding_dim=32, input_size=size).eval()
        with torch.no_grad():
            assert net(torch.randn(2, 3, size, size)).shape == (2, 32)


def test_five_point_training_faces_match_the_pipeline(lfw: Path) -> None:
    """dlib_resnet training faces (detected once into the cache) embed exactly as
    `facelab.embed` embeds the same images at inference."""
    import facelab
    from facelab.train.batches import decode_faces

    model = facelab.load_model("dlib_resnet")
    paths = sorted((lfw / "images" / "Tony_Blair").glob("*.jpg"))[:3]
    faces = decode_faces(paths, model.preprocess, cache_dir=None, workers=1)
    trained_on = model.embed_tensors(model.preprocess.normalise(torch.from_numpy(faces)))
    inferred = facelab.embed(model, paths)
    assert np.abs(trained_on - inferred).max() < 1e-4  # batch-size rounding only
