"""Classification heads: margins against direct formulas, eval logits, safe gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facelab.models import HEADS

NUM_CLASSES, DIM = 4, 8


def _head(name: str, **options: float) -> torch.nn.Module:
    """A margin head whose class centres are the first unit vectors, in float64."""
    head = HEADS.create(name, embedding_dim=DIM, num_classes=NUM_CLASSES, **options).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(NUM_CLASSES, DIM, dtype=torch.float64))
    return head


def _at_angles(angles: list[float], labels: torch.Tensor) -> torch.Tensor:
    """Features at the given angles from their own class centre (towards the next class)."""
    features = torch.zeros(len(angles), DIM, dtype=torch.float64)
    for row, (angle, label) in enumerate(zip(angles, labels.tolist(), strict=True)):
        features[row, label] = math.cos(angle)
        features[row, (label + 1) % NUM_CLASSES] = math.sin(angle)
    return 3.0 * features  # the heads must not depend on the feature norm


def test_arcface_adds_the_angular_margin_at_the_target_only() -> None:
    head = _head("arcface")
    labels = torch.tensor([0, 1, 2, 3, 0])
    angles = [0.1, 0.7, 1.5, 2.2, 2.6]  # all below pi - m = 2.64
    features = _at_angles(angles, labels)
    plain = head(features)
    logits = head(features, labels)
    expected = plain.clone()
    for row, (angle, label) in enumerate(zip(angles, labels.tolist(), strict=True)):
        assert plain[row, label].item() == pytest.approx(64 * math.cos(angle), abs=1e-9)
        expected[row, label] = 64 * math.cos(angle + 0.5)
    torch.testing.assert_close(logits, expected)


def test_arcface_falls_back_to_a_cosine_margin_past_pi_minus_m() -> None:
    head = _head("arcface", margin=0.5, scale=30.0)
    labels = torch.tensor([2])
    logits = head(_at_angles([3.0], labels), labels)
    expected = 30.0 * (math.cos(3.0) - 0.5 * math.sin(0.5))
    assert logits[0, 2].item() == pytest.approx(expected, abs=1e-9)


def test_cosface_subtracts_the_margin_from_the_target_cosine() -> None:
    head = _head("cosface")
    labels = torch.tensor([0, 3, 1])
    features = _at_angles([0.3, 1.2, 3.0], labels)
    expected = head(features)
    expected[torch.arange(3), labels] -= 64 * 0.35
    torch.testing.assert_close(head(features, labels), expected)


@pytest.mark.parametrize("name", ["arcface", "cosface"])
def test_margin_and_scale_can_change_during_training(name: str) -> None:
    head = _head(name)
    labels = torch.tensor([0, 1])
    features = _at_angles([0.4, 1.1], labels)
    head.margin = 0.0
    torch.testing.assert_close(head(features, labels), head(features))
    head.scale = 16.0
    cosine = F.normalize(features, dim=1) @ head.weight.T
    torch.testing.assert_close(head(features), 16.0 * cosine)


def test_softmax_head_is_a_linear_layer_that_ignores_labels() -> None:
    head = HEADS.create("softmax", embedding_dim=DIM, num_classes=NUM_CLASSES)
    features = torch.randn(3, DIM)
    expected = features @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(features), expected)
    torch.testing.assert_close(head(features, torch.tensor([0, 1, 2])), expected)


@pytest.mark.parametrize("name", ["arcface", "cosface"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["angle-0", "angle-pi"])
def test_gradients_are_finite_at_the_extreme_angles(name: str, sign: float) -> None:
    """Features exactly on (or opposite) their class centre: sqrt(1 - cos^2) is 0 there."""
    torch.manual_seed(0)
    head = HEADS.create(name, embedding_dim=DIM, num_classes=NUM_CLASSES)
    labels = torch.tensor([0, 1, 2, 3])
    features = (sign * 2.0 * head.weight.detach()[labels]).requires_grad_()
    logits = head(features, labels)
    F.cross_entropy(logits, labels).backward()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(features.grad).all()
    assert torch.isfinite(head.weight.grad).all()
