"""Operating points: computed right, carried by models and checkpoints, and used by default by
verify (API, CLI, server) and identify, which say where their threshold came from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serving import KEYS, READ, png, tiny_model, upload

import facelab
from facelab.cli import main
from facelab.data.trials import read_trials
from facelab.eval.metrics import threshold_at_far
from facelab.gallery import GalleryError, GalleryStore, ModelInfo, enroll, identify
from facelab.models.checkpoint import load_checkpoint, save_checkpoint
from facelab.models.face_model import FaceModel
from facelab.models.operating_points import (
    SHIPPED_FARS,
    TARGET_FARS,
    OperatingPoint,
    model_card,
    pretrained_operating_points,
)
from facelab.models.registry import BACKBONES
from facelab.serve import ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def brute_force_point(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple:
    """(threshold, FAR, FRR): try every score as the threshold (and one above them all), keep
    those whose FAR is at most `far`, take the one accepting the most genuine pairs."""
    candidates = np.r_[np.unique(np.r_[genuine, impostor]), np.inf]
    best = None
    for t in candidates:
        fa = float(np.mean(impostor >= t))
        if fa <= far * (1 + 1e-9):
            tpr = float(np.mean(genuine >= t))
            if best is None or tpr > best[2] or (tpr == best[2] and t < best[0]):
                best = (t, fa, tpr)
    threshold, fa, tpr = best
    return threshold, fa, 1.0 - tpr


@pytest.mark.parametrize("seed", range(6))
def test_threshold_at_far_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    genuine = rng.normal(0.7, 0.1, 300)
    impostor = rng.normal(0.3, 0.15, 2000)
    if seed % 2:  # ties across and within classes, as quantised scores have
        genuine, impostor = np.round(genuine, 2), np.round(impostor, 2)
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(300, bool), np.zeros(2000, bool)]
    for far in (1e-1, 1e-2, 1e-3):
        point = threshold_at_far(scores, labels, far)
        threshold, fa, frr = brute_force_point(genuine, impostor, far)
        if np.isinf(threshold):  # nothing can be accepted: ours is just above the top score
            assert point["threshold"] > scores.max() and point["frr"] == 1.0
        else:
            assert point["threshold"] == threshold
        assert point["far"] == pytest.approx(fa) and point["frr"] == pytest.approx(frr)
        assert (point["n_genuine"], point["n_impostor"]) == (300, 2000)


def points(trials: str = "synthetic trials") -> tuple[OperatingPoint, ...]:
    return tuple(
        OperatingPoint(far, threshold, far, frr, 100, 50_000, trials)
        for far, threshold, frr in ((1e-2, 0.3, 0.01), (1e-3, 0.6, 0.05), (1e-4, 0.9, 0.2))
    )


@pytest.fixture(scope="module")
def calibrated() -> FaceModel:
    model = tiny_model()
    model.operating_points = points()
    return model


def test_description_carries_points_and_an_old_one_has_none(calibrated: FaceModel) -> None:
    desc = calibrated.describe()
    assert FaceModel.from_description(desc).operating_points == calibrated.operating_points
    assert calibrated.for_inference().operating_points == calibrated.operating_points
    old = {k: v for k, v in desc.items() if k != "operating_points"}
    assert FaceModel.from_description(old).operating_points == ()
    with pytest.raises(ValueError, match="lacks threshold"):
        OperatingPoint.from_dict(
            {k: v for k, v in points()[0].to_dict().items() if k != "threshold"}
        )


def test_verify_decides_at_far_1e3_by_default_and_says_why(calibrated: FaceModel) -> None:
    images = [np.random.default_rng(s).integers(0, 255, (40, 40, 3), np.uint8) for s in (1, 2)]
    score = float(np.prod(facelab.embed(calibrated, images), axis=0).sum())
    for model_point, far in ((points()[1], None), (points()[0], 1e-2), (points()[2], 1e-4)):
        result = facelab.verify(calibrated, *images, far=far)
        assert result.threshold == model_point.threshold
        assert result.same == (score >= model_point.threshold)
        assert f"operating point FAR {model_point.target_far:g}" in result.reason
        assert "synthetic trials" in result.reason
    given = facelab.verify(calibrated, *images, threshold=-1.0)
    assert (given.same, given.reason) == (True, "threshold -1.0000 (given by the caller)")
    with pytest.raises(ValueError, match="not both"):
        facelab.verify(calibrated, *images, threshold=0.5, far=1e-3)


def test_model_without_points_says_no_threshold_is_known() -> None:
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)
    result = facelab.verify(tiny_model(), image, image)
    assert (result.threshold, result.same) == (None, None)
    assert "no threshold known" in result.reason and "mobilefacenet" in result.reason


def save_images(tmp_path: Path) -> tuple[Path, Path]:
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(png(seed))
        paths.append(path)
    return paths[0], paths[1]


def test_cli_verify_uses_the_checkpoint_points(
    calibrated: FaceModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a, b = save_images(tmp_path)
    ckpt = save_checkpoint(tmp_path / "m.pt", calibrated)
    old = save_checkpoint(tmp_path / "old.pt", tiny_model())
    assert main(["verify", str(ckpt), str(a), str(b)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == 0.6 and isinstance(out["same"], bool)
    assert "operating point FAR 0.001" in out["reason"]
    assert main(["verify", str(ckpt), str(a), str(b), "--far", "0.01"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.3
    assert main(["verify", str(old), str(a), str(b)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["same"] is None and "no threshold known" in out["reason"]


def test_server_verify_uses_the_model_points(calibrated: FaceModel, tmp_path: Path) -> None:
    files = [upload("image_a", png(1)), upload("image_b", png(2))]
    app = create_app(calibrated, ServeConfig(gallery=tmp_path / "g.db", keys=KEYS))
    with TestClient(app) as client:
        r = client.post("/v1/verify", files=files, headers=READ).json()
    assert r["threshold"]["value"] == 0.6 and r["threshold"]["target_far"] == 1e-3
    assert "operating point FAR 0.001" in r["threshold"]["source"] and r["no_threshold"] is None
    assert r["decision"] == ("same" if r["score"] >= 0.6 else "different")
    app = create_app(tiny_model(), ServeConfig(gallery=tmp_path / "h.db", keys=KEYS))
    with TestClient(app) as client:
        r = client.post("/v1/verify", files=files, headers=READ).json()
    assert r["decision"] is None and "no threshold known" in r["no_threshold"]


def test_identify_falls_back_to_the_model_point(calibrated: FaceModel, tmp_path: Path) -> None:
    gallery = tmp_path / "g.db"
    images = [np.random.default_rng(s).integers(0, 255, (40, 40, 3), np.uint8) for s in (1, 2)]
    enroll(gallery, calibrated, "Ada", images[:1], progress=False)
    (result,) = identify(gallery, calibrated, images[1:])
    assert result.threshold.value == 0.6 and "operating point FAR 0.001" in result.threshold.source
    with GalleryStore(gallery) as store:  # a gallery calibrated for the FAR asked wins
        own = replace(result.threshold, value=0.1, source="calibrated on x")
        store.set_threshold(own, ModelInfo.of(calibrated))
    (result,) = identify(gallery, calibrated, images[1:])
    assert (result.threshold.value, result.threshold.source) == (0.1, "calibrated on x")
    plain = tmp_path / "plain.db"
    enroll(plain, tiny_model(), "Ada", images[:1], progress=False)
    with pytest.raises(GalleryError, match="no threshold known"):
        identify(plain, tiny_model(), images[1:])


def test_train_checkpoint_carries_points_from_its_validation_trials(
    lfw_subset: Path, tmp_path: Path
) -> None:
    from test_train import tiny_config, write_pairs

    from facelab.train import train

    pairs = write_pairs(lfw_subset, tmp_path / "pairs.csv")
    cfg = replace(tiny_config(lfw_subset, tmp_path / "run", 1), val_trials=str(pairs))
    result = train(cfg)
    stored = load_checkpoint(result.checkpoint)["model"]["operating_points"]
    assert [p["target_far"] for p in stored] == list(TARGET_FARS)
    assert all(p["trials"] == f"validation trials {pairs}" for p in stored)
    assert all((p["n_genuine"], p["n_impostor"]) == (18, 15) for p in stored)
    model = facelab.load_model(result.checkpoint)
    trials = read_trials(pairs)
    scores = facelab.score_trials(model, trials)
    labels = np.array([t.label for t in trials])
    for point in model.operating_points:
        expected = threshold_at_far(scores, labels, point.target_far)
        assert point.threshold == pytest.approx(expected["threshold"], abs=1e-4)
        assert point.frr == pytest.approx(expected["frr"], abs=1 / 18 + 1e-9)
    a, b = sorted((lfw_subset / "Tony_Blair").iterdir())[:2]
    assert "operating point FAR 0.001" in facelab.verify(model, a, b).reason
    # fine-tuned without validation trials: the starting model's points are not carried over
    tuned = replace(cfg, out=str(tmp_path / "tuned"), init_from=str(result.checkpoint))
    tuned = replace(tuned, val_trials=None)
    stored = load_checkpoint(train(tuned).checkpoint)["model"]["operating_points"]
    assert stored == []


BLAIR = "Tony_Blair/Tony_Blair_0001.jpg"
BUSH = "George_W_Bush/George_W_Bush_0005.jpg"


def test_shipped_points_say_blair_is_not_bush(lfw: Path) -> None:
    """The README's old example: at threshold 0.5 these two were "the same" (cosine 0.867)."""
    if not pretrained_operating_points("dlib_resnet"):
        pytest.fail("dlib_resnet ships no operating points (model_cards.json)")
    model = facelab.load_model("dlib_resnet")
    result = facelab.verify(model, lfw / "images" / BLAIR, lfw / "images" / BUSH)
    assert result.score == pytest.approx(0.867, abs=0.01)
    assert result.same is False and "dlib_resnet's operating point FAR 0.001" in result.reason
    same = facelab.verify(
        model, lfw / "images" / BLAIR, lfw / "images/Tony_Blair/Tony_Blair_0002.jpg"
    )
    assert same.same is True


@pytest.mark.parametrize("name", ["dlib_resnet", "dlib_resnet_chip"])
def test_shipped_points_record_their_provenance(name: str) -> None:
    card = model_card(name)["operating_points"]
    assert card["calibration"]["trials"] == "pairsDevTrain.txt"
    assert card["report"]["trials"].startswith("pairs.txt")
    assert card["calibration"]["impostor_pairs"] > 1_000_000  # enough to measure 1e-4
    assert "benchmarks/calibrate_pretrained.py" in card["command"] and card["date"]
    shipped = pretrained_operating_points(name)
    assert BACKBONES.get(name).operating_points == shipped
    assert [p.target_far for p in shipped] == list(SHIPPED_FARS)
    assert all(p.resolved and p.far <= p.target_far for p in shipped)
    assert [p.threshold for p in shipped] == sorted(p.threshold for p in shipped)  # stricter
    model = FaceModel.create(name)  # random weights: the shipped points are not theirs
    assert model.operating_points == ()


@pytest.mark.slow
def test_shipped_dlib_points_hold_on_a_view2_subset(lfw: Path) -> None:
    """Every cross-identity pair of 300 View 2 images outside the calibration list (~45,000
    impostor pairs) at the shipped thresholds: FAR within a factor of 2.5 of the target where
    the pairs can measure it."""
    calibration = {p for t in read_trials(lfw / "pairsDevTrain.txt") for p in (t.a, t.b)}
    view2 = {p for t in read_trials(lfw / "pairs.txt") for p in (t.a, t.b)}
    images = sorted(view2 - calibration)[::15][:300]
    model = facelab.load_model("dlib_resnet")
    emb = facelab.embed(model, images)
    people = np.array([p.parent.name for p in images])
    i, j = np.triu_indices(len(images), k=1)
    impostor = (emb[i] * emb[j]).sum(1)[people[i] != people[j]]
    for point in pretrained_operating_points("dlib_resnet"):
        far = float(np.mean(impostor >= point.threshold))
        if point.target_far * len(impostor) >= 20:
            assert point.target_far / 2.5 <= far <= point.target_far * 2.5, (point, far)
        else:
            assert far <= 20 / len(impostor)


# -- plots --------------------------------------------------------------------------------------


def marker(ax, label: str):  # noqa: ANN001, ANN201
    (line,) = [a for a in ax.get_children() if a.get_gid() == f"operating point {label}"]
    return line


def test_plots_mark_operating_points_where_their_thresholds_fall() -> None:
    from facelab.eval.metrics import roc_curve
    from facelab.eval.plots import det_figure, rates_at, roc_figure, score_histogram_figure

    rng = np.random.default_rng(0)
    genuine, impostor = rng.normal(0.7, 0.1, 500), rng.normal(0.3, 0.15, 5000)
    scores = np.r_[genuine, impostor]
    labels = np.r_[np.ones(500, bool), np.zeros(5000, bool)]
    marks = [("FAR 1e-2", 0.6), ("FAR 1e-3", 0.7)]  # both accept some impostors
    points = rates_at(scores, labels, marks)
    fpr, tpr, _ = roc_curve(scores, labels)

    roc = roc_figure(fpr, tpr, points=points)
    linear, log = roc.axes
    assert (linear.get_xscale(), log.get_xscale()) == ("linear", "log")
    assert log.get_xlim() == pytest.approx((1e-4, 1.0))
    det = det_figure(fpr, tpr, points=points).axes[0]
    assert (det.get_xscale(), det.get_yscale()) == ("log", "log")
    hist = score_histogram_figure(scores, labels, marks=marks).axes[0]
    for label, threshold in marks:
        far, tar = np.mean(impostor >= threshold), np.mean(genuine >= threshold)
        for ax in (linear, log):
            assert list(marker(ax, label).get_xydata()[0]) == pytest.approx([far, tar])
        assert list(marker(det, label).get_xydata()[0]) == pytest.approx([far, 1 - tar])
        assert list(marker(hist, label).get_xdata()) == [threshold, threshold]
    # FAR 0 cannot sit on a log axis: drawn on its edge, pointing off it, and labelled so
    top = [("strict", scores.max() + 0.01)]
    edge = marker(roc_figure(fpr, tpr, points=rates_at(scores, labels, top)).axes[1], "strict")
    assert list(edge.get_xydata()[0]) == [1e-4, 0.0] and edge.get_marker() == "<"
    assert "FAR 0: on the axis edge" in edge.get_label()


def test_eval_writes_roc_det_and_histogram_with_the_model_points(
    calibrated: FaceModel, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    lines = ["img1,img2,label"]
    for i in range(12):
        base = rng.integers(0, 255, (40, 40, 3))
        for j in (0, 1):
            noisy = np.clip(base + rng.integers(-15, 15, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(tmp_path / f"{i}_{j}.png")
        lines.append(f"{i}_0.png,{i}_1.png,1")
        lines.append(f"{i}_0.png,{(i + 1) % 12}_1.png,0")
    (tmp_path / "trials.csv").write_text("\n".join(lines) + "\n")
    ckpt = save_checkpoint(tmp_path / "m.pt", calibrated)
    out = tmp_path / "eval"
    assert main(["eval", str(ckpt), str(tmp_path / "trials.csv"), "--out", str(out)]) == 0
    for png_file in ("roc.png", "det.png", "scores.png"):
        assert (out / png_file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "metrics.json").read_text())
    assert [p["label"] for p in report["operating_points"]] == [
        f"mobilefacenet FAR {far:g}" for far in TARGET_FARS
    ]
    assert [p["threshold"] for p in report["operating_points"]] == [0.3, 0.6, 0.9]
    assert json.loads(capsys.readouterr().out)["operating_points"] == report["operating_points"]


def test_onnx_file_carries_the_points_but_an_int8_copy_does_not(
    calibrated: FaceModel, tmp_path: Path
) -> None:
    from facelab.models.export import export_onnx, load_onnx

    export_onnx(calibrated, tmp_path / "m.onnx")
    assert load_onnx(tmp_path / "m.onnx").operating_points == calibrated.operating_points
    export_onnx(calibrated, tmp_path / "q.onnx", quantization="int8")
    assert load_onnx(tmp_path / "q.onnx").operating_points == ()
