"""Triplet mining on hand-made distance matrices, against brute force; center loss; guards."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facelab.train.losses import (
    MIN_SPREAD,
    CenterLoss,
    FailureGuard,
    TrainingFailure,
    TripletLoss,
    batch_all_loss,
    batch_hard_loss,
    build_criterion,
    embedding_spread,
    pairwise_distances,
    semi_hard_loss,
)

MARGIN = 0.2


def leaf(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


def picked(grad: torch.Tensor) -> set[tuple[int, int]]:
    """The distance entries a loss depends on (non-zero gradient)."""
    return {tuple(ix) for ix in grad.nonzero().tolist()}


def test_batch_hard_uses_farthest_positive_and_closest_negative() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    far = 3.0
    d = leaf(
        [
            [0.0, 0.3, 0.5, 0.4],  # anchor 0: hardest positive 2 (0.5), only negative 3 (0.4)
            [0.3, 0.0, 0.1, far],  # anchor 1: 0.3 - 3.0 + margin < 0
            [0.5, 0.1, 0.0, far],  # anchor 2: 0.5 - 3.0 + margin < 0
            [0.4, far, far, 0.0],  # anchor 3: no positive
        ]
    )
    loss = batch_hard_loss(d, labels, MARGIN)
    assert loss.item() == pytest.approx((0.5 - 0.4 + MARGIN) / 3)  # mean over anchors 0..2
    loss.backward()
    assert picked(d.grad) == {(0, 2), (0, 3)}
    assert d.grad[0, 2] > 0 > d.grad[0, 3]


def test_semi_hard_picks_the_closest_negative_farther_than_the_positive() -> None:
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    big = 1.5
    d = leaf(
        [
            [0.0, 0.3, 0.2, 0.4, 0.45, 0.9],  # hard 0.2, semi-hard 0.4 and 0.45, easy 0.9
            [0.3, 0.0, big, big, big, big],  # every negative beyond the margin: loss 0
            *[[big] * 6 for _ in range(4)],  # no positives
        ]
    )
    loss = semi_hard_loss(d, labels, MARGIN)
    assert loss.item() == pytest.approx((0.3 - 0.4 + MARGIN) / 2)  # pairs (0, 1) and (1, 0)
    loss.backward()
    assert picked(d.grad) == {(0, 1), (0, 3)}


def test_semi_hard_falls_back_to_the_farthest_negative() -> None:
    labels = torch.tensor([0, 0, 1, 2])
    d = leaf([[0.0, 0.8, 0.2, 0.5], [0.8, 0.0, 9, 9], [9, 9, 0.0, 9], [9, 9, 9, 0.0]])
    loss = semi_hard_loss(d, labels, MARGIN)  # anchor 0: both negatives closer than positive
    loss.backward()
    assert loss.item() == pytest.approx((0.8 - 0.5 + MARGIN) / 2)
    assert picked(d.grad) == {(0, 1), (0, 3)}


def test_batch_all_averages_only_the_triplets_with_positive_loss() -> None:
    labels = torch.tensor([0, 0, 1, 2])
    d = leaf(
        [
            [0.0, 0.5, 0.4, 1.0],  # (0,1,2): 0.3   (0,1,3): 0
            [0.5, 0.0, 0.6, 0.8],  # (1,0,2): 0.1   (1,0,3): 0
            [0.4, 0.6, 0.0, 1.0],
            [1.0, 0.8, 1.0, 0.0],
        ]
    )
    loss = batch_all_loss(d, labels, MARGIN)
    assert loss.item() == pytest.approx((0.3 + 0.1) / 2)
    loss.backward()
    assert picked(d.grad) == {(0, 1), (0, 2), (1, 0), (1, 2)}


def brute_force(d: torch.Tensor, labels: list[int], mining: str) -> float:
    """Straight loops over anchors, positives and negatives, as the papers define them."""
    n = len(labels)
    pos = {a: [p for p in range(n) if p != a and labels[p] == labels[a]] for a in range(n)}
    neg = {a: [x for x in range(n) if labels[x] != labels[a]] for a in range(n)}
    terms = []
    for a in range(n):
        if not pos[a] or not neg[a]:
            continue
        if mining == "batch-hard":
            hp = max(d[a, p] for p in pos[a])
            hn = min(d[a, x] for x in neg[a])
            terms.append(max(hp - hn + MARGIN, 0.0))
            continue
        for p in pos[a]:
            if mining == "batch-all":
                terms += [max(d[a, p] - d[a, x] + MARGIN, 0.0) for x in neg[a]]
            else:
                farther = [d[a, x] for x in neg[a] if d[a, x] > d[a, p]]
                chosen = min(farther) if farther else max(d[a, x] for x in neg[a])
                terms.append(max(d[a, p] - chosen + MARGIN, 0.0))
    if mining == "batch-all":
        terms = [t for t in terms if t > 0]
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("mining", ["batch-all", "batch-hard", "semi-hard"])
def test_mining_matches_brute_force_on_random_embeddings(mining: str) -> None:
    torch.manual_seed(0)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3]
    emb = torch.randn(len(labels), 6)
    loss = TripletLoss(mining, MARGIN)(emb, torch.tensor(labels))
    expected = brute_force(pairwise_distances(emb).double(), labels, mining)
    assert loss.item() == pytest.approx(float(expected), abs=1e-6)


def test_pairwise_distances_of_unit_vectors() -> None:
    emb = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # normalised inside
    d = pairwise_distances(emb)
    assert d[0, 1].item() == pytest.approx(math.sqrt(2), abs=1e-6)
    assert d[0, 2].item() == pytest.approx(2.0, abs=1e-6)
    assert d.diagonal().max().item() < 1e-5


def test_center_loss_value_and_gradients() -> None:
    center = CenterLoss(num_classes=2, embedding_dim=2, weight=0.1)
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    features = torch.tensor([[0.0, 1.0], [0.0, 5.0]], requires_grad=True)  # unit: (0, 1) twice
    labels = torch.tensor([0, 1])
    loss = center(features, labels)
    # sample 0 is sqrt(2) from centre 0, sample 1 sits on centre 1: 0.1 * 0.5 * (2 + 0) / 2
    assert loss.item() == pytest.approx(0.05)
    loss.backward()
    # the centre moves at the full rate whatever the weight: d/dc 0.5 * mean ||x - c||^2
    assert torch.allclose(center.centers.grad[0], torch.tensor([0.5, -0.5]))
    assert torch.allclose(center.centers.grad[1], torch.zeros(2))
    assert features.grad[0].abs().sum() > 0 and features.grad[1].abs().sum() < 1e-7


def test_criterion_switch_builds_heads_and_triplets() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.randn(4, 8)
    for name in ("softmax", "arcface", "cosface", "triplet-batch-hard", "triplet-semi-hard"):
        criterion = build_criterion(name, 8, 2, center_loss=0.01)
        assert torch.isfinite(criterion(emb, labels)), name
        assert (criterion.head is None) == name.startswith("triplet"), name
    assert build_criterion("triplet-batch-all", 8, 2, {"margin": 0.5}).margin == 0.5
    with pytest.raises(ValueError, match="triplet-batch-hard"):
        build_criterion("triplet-hardest", 8, 2)


def test_collapsed_embeddings_trigger_the_guard() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    same = torch.ones(6, 4)  # every face mapped to one point
    loss = TripletLoss("batch-hard", MARGIN)(same, labels)
    assert loss.item() == pytest.approx(MARGIN, abs=1e-5)
    assert embedding_spread(same).item() < MIN_SPREAD
    guard = FailureGuard(patience=3, margin=MARGIN, fp16=False, lr=0.1)
    guard.check(1, loss.item(), embedding_spread(same).item())
    guard.check(2, loss.item(), 0.5)  # loss stuck at the margin alone counts as well
    with pytest.raises(TrainingFailure, match="collapsed"):
        guard.check(3, loss.item(), embedding_spread(same).item())


def test_guard_resets_on_healthy_steps_and_names_fp16_for_nan() -> None:
    guard = FailureGuard(patience=2, margin=MARGIN, fp16=False, lr=0.1)
    for step in range(5):  # collapsed every other step: never `patience` in a row
        loss, spread = (MARGIN, 1e-5) if step % 2 else (0.35, 0.8)
        guard.check(step, loss, spread)
    with pytest.raises(TrainingFailure, match="learning rate"):
        guard.check(6, math.inf, 0.8)
    with pytest.raises(TrainingFailure, match="float16"):
        FailureGuard(0, None, fp16=True, lr=0.1).check(1, math.nan, 0.8)
    FailureGuard(0, None, fp16=False, lr=0.1).check(1, 1.0, 0.0)  # patience 0: never stops


def test_triplet_gradient_spreads_a_near_collapse() -> None:
    """A few steps of batch-hard on nearly identical embeddings push the identities apart."""
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(2)
    emb = (torch.ones(8, 4) + 0.01 * torch.randn(8, 4)).requires_grad_()
    opt = torch.optim.SGD([emb], lr=0.5)
    before = embedding_spread(emb).item()
    for _ in range(20):
        loss = TripletLoss("batch-hard", MARGIN)(emb, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert embedding_spread(emb).item() > 5 * before
    assert F.normalize(emb, dim=1).isfinite().all()


def test_mining_handles_batches_without_triplets() -> None:
    emb = torch.randn(3, 4, requires_grad=True)
    for mining in ("batch-all", "batch-hard", "semi-hard"):
        loss = TripletLoss(mining)(emb, torch.tensor([0, 1, 2]))  # no positives
        loss.backward()
        assert loss.item() == 0 and torch.isfinite(emb.grad).all()
