"""`facelab models` / `facelab.list_models()`: every registered model with its facts, and FLOP
counts that agree with torch's own counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import facelab
from facelab.cli import main
from facelab.models.catalogue import count_flops
from facelab.models.registry import BACKBONES, DETECTORS

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FIELDS = {
    "name",
    "kind",
    "input",
    "alignment",
    "embedding_dim",
    "parameters",
    "gflops",
    "gflops_counted_on",
    "pretrained",
    "licence",
    "source",
    "lfw_view2",
    "operating_points",
}


def test_models_json_and_table_list_every_registered_model(
    capsys: pytest.CaptureFixture,
) -> None:
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == BACKBONES.names() + DETECTORS.names()
    for m in listed:
        assert set(m) == FIELDS, m["name"]
        assert m["parameters"] > 0 and m["gflops"] > 0 and m["licence"] and m["source"]
    by_name = {m["name"]: m for m in listed}
    dlib = by_name["dlib_resnet"]
    assert (dlib["kind"], dlib["input"], dlib["alignment"]) == (
        "backbone",
        "150x150 RGB",
        "five_point",
    )
    assert dlib["embedding_dim"] == 128 and dlib["parameters"] == 5_614_592
    assert dlib["pretrained"] and dlib["lfw_view2"]["accuracy"] > 0.98
    assert "pairsDevTrain" in dlib["operating_points"]["points"][1]["trials"]
    assert by_name["resnet18"]["operating_points"] is None and not by_name["resnet18"]["pretrained"]
    assert by_name["mtcnn"]["kind"] == "detector" and by_name["mtcnn"]["embedding_dim"] is None

    assert main(["models"]) == 0
    table = capsys.readouterr().out
    for m in listed:
        assert f"| {m['name']} | {m['kind']} |" in table
    assert "dlib_resnet operating points, calibrated on pairsDevTrain.txt" in table
    assert [m.name for m in facelab.list_models()] == [m["name"] for m in listed]


@pytest.mark.parametrize("name", ["dlib_resnet", "mobilenetv2", "inception"])
def test_flop_hooks_agree_with_torch_flop_counter(name: str) -> None:
    entry = BACKBONES.get(name)
    network = entry.constructor().eval()
    shape = (1, 3, entry.preprocess.size, entry.preprocess.size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(torch.zeros(shape))
    assert count_flops(network, shape)[0] == counter.get_total_flops()
