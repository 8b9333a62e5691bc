"""Reading MTCNN's P-, R- and O-Net weights as shipped by facenet-pytorch (state-dict `.pt` files).

facenet-pytorch itself cannot be imported here (it needs torchvision), so its weight files are
found through the import system without executing the package, then read as plain state dicts.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import zipfile
from pathlib import Path

import torch

NETS = ("pnet", "rnet", "onet")
INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"


class WeightsError(ValueError):
    """MTCNN weights are missing or unusable; the message names the file and the fix."""


def facenet_pytorch_weights_dir() -> Path:
    """The `data/` folder of the installed facenet-pytorch, which holds pnet/rnet/onet.pt."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"MTCNN weights not found: facenet-pytorch is not installed. Run `{INSTALL_HINT}` "
            "(only its weight files are used) or pass a folder holding pnet.pt, rnet.pt, onet.pt."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_mtcnn_state_dicts(folder: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read `pnet.pt`, `rnet.pt` and `onet.pt` from `folder`, keyed by net name, on the CPU."""
    folder = Path(folder)
    state_dicts = {}
    for net in NETS:
        path = folder / f"{net}.pt"
        if not path.is_file():
            raise WeightsError(
                f"{path}: MTCNN weight file not found; pass a folder holding pnet.pt, rnet.pt and "
                f"onet.pt, or use the files of facenet-pytorch (`{INSTALL_HINT}`)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (
            OSError,
            RuntimeError,
            EOFError,
            ValueError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as exc:
            raise WeightsError(
                f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {exc})"
            ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise WeightsError(
                f"{path}: expected a state dict of tensors, got {type(state).__name__}"
            )
        state_dicts[net] = state
    return state_dicts
