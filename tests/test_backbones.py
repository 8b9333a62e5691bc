"""Backbones built by name: shapes for small and large inputs, a real training step, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from facelab.models import BACKBONES, HEADS, FaceModel
from facelab.models.backbones.layers import downsample_strides, final_map_size

NAMES = ["resnet18", "resnet34", "mobilefacenet", "mobilenetv2", "shufflenetv2"]
DIM = 128


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "size"),
    [(name, size) for name in NAMES for size in (32, 112)] + [("mobilefacenet", 224)],
)
def test_embedding_shape_in_train_and_eval_mode(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = BACKBONES.create(name, embedding_dim=DIM, input_size=size)
    x = torch.randn(2, 3, size, size)
    info = f"{name} @ {size}px, {_param_count(model):,} parameters"
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, DIM), info
        assert torch.isfinite(out).all(), info
    assert not torch.equal(out[0], out[1]), f"{info}: different faces, identical embeddings"


@pytest.mark.parametrize("name", NAMES)
def test_sgd_steps_reduce_the_loss(name: str) -> None:
    """A few plain SGD steps on one fixed batch must clearly lower its softmax loss."""
    torch.manual_seed(0)
    options = {"width": 0.5} if name.startswith("resnet") else {}  # keep the test fast
    model = BACKBONES.create(name, embedding_dim=32, input_size=32, **options)
    head = HEADS.create("softmax", embedding_dim=32, num_classes=4)
    x, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    optimiser = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.05)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(head(model(x), labels), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(F.cross_entropy(head(model(x), labels), labels).item())
    assert losses[-1] < 0.7 * losses[0], f"{name}: losses {[round(v, 3) for v in losses]}"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_stride_rule_keeps_a_sensible_final_map() -> None:
    assert downsample_strides(112, 4) == [2, 2, 2, 2]
    assert final_map_size(112, downsample_strides(112, 4)) == 7
    assert downsample_strides(32, 4) == [1, 2, 2, 2]
    assert downsample_strides(32, 5) == [1, 1, 2, 2, 2]
    for size in (32, 48, 64, 96, 100, 112, 160, 224):
        for halvings in (4, 5):
            assert final_map_size(size, downsample_strides(size, halvings)) >= 4
    with pytest.raises(ValueError, match="at least 32"):
        downsample_strides(16, 4)


def test_width_and_dropout_options() -> None:
    narrow = BACKBONES.create("resnet18", embedding_dim=DIM, input_size=32, width=0.5, dropout=0.2)
    full = BACKBONES.create("resnet18", embedding_dim=DIM, input_size=32)
    assert _param_count(narrow) < 0.5 * _param_count(full)
    small = BACKBONES.create("mobilenetv2", embedding_dim=DIM, input_size=32, width=0.5)
    assert _param_count(small) < _param_count(BACKBONES.create("mobilenetv2", embedding_dim=DIM))
    for width in (0.5, 1.5):
        shuffle = BACKBONES.create("shufflenetv2", embedding_dim=DIM, input_size=32, width=width)
        assert shuffle.eval()(torch.randn(1, 3, 32, 32)).shape == (1, DIM)
    with pytest.raises(ValueError, match="width"):
        BACKBONES.create("shufflenetv2", width=0.75)


def test_wrong_input_size_fails_clearly() -> None:
    model = BACKBONES.create("mobilefacenet", embedding_dim=DIM, input_size=112).eval()
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(1, 3, 96, 96))


def test_face_model_takes_its_preprocessing_size_from_input_size() -> None:
    model = FaceModel.create("mobilenetv2", embedding_dim=64, input_size=64)
    assert model.preprocess.size == 64
    assert model.embedding_dim == 64
