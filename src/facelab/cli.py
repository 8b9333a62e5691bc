"""`facelab` command line: a thin layer that parses arguments and calls `facelab.api`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from facelab import api
from facelab.data.images import ImageError
from facelab.models.checkpoint import CheckpointError

log = logging.getLogger("facelab")

COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {}


def command(name: str) -> Callable:
    def decorator(fn: Callable[[argparse.Namespace], Any]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return decorator


def _parse_value(text: str) -> Any:
    """CLI override values are YAML scalars or lists: 0.1, true, [0.8, 1.0], {flip: true}."""
    return yaml.safe_load(text)


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.replace("-", "_")] = _parse_value(value)
    return out


@command("train")
def _train(args: argparse.Namespace) -> None:
    from facelab.train import TrainConfig, train

    overrides = _overrides(args.set)
    if args.data:
        overrides["data"] = args.data
    if args.out:
        overrides["out"] = args.out
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, **overrides)
    else:
        cfg = TrainConfig.from_dict(overrides, source="command line")
    if not args.resume and not cfg.data:
        raise SystemExit("facelab train: give --data ROOT (or data: in --config)")
    result = train(cfg, resume=args.resume)
    print(json.dumps({"checkpoint": str(result.checkpoint), "last": result.history[-1] if result.history else None}))


@command("eval")
def _eval(args: argparse.Namespace) -> None:
    model = api.load_model(args.model)
    report = api.evaluate(model, args.trials, args.images_root, flip=args.flip, out_dir=args.out)
    print(json.dumps(report, indent=2))


@command("classify")
def _classify(args: argparse.Namespace) -> None:
    print(json.dumps(api.classify(args.checkpoint, split=args.split)))


@command("verify")
def _verify(args: argparse.Namespace) -> None:
    model = api.load_model(args.model)
    result = api.verify(model, args.a, args.b, threshold=args.threshold, flip=args.flip)
    print(json.dumps(result.__dict__))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a backbone + head on an identity folder")
    p.add_argument("--config", help="YAML file of TrainConfig fields")
    p.add_argument("--data", help="identity-folder root")
    p.add_argument("--out", help="run folder")
    p.add_argument("--epochs", type=int)
    p.add_argument("--resume", help="continue from this checkpoint (model, optimizer, schedule, RNG)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, e.g. --set lr=0.05 loss=arcface")

    p = sub.add_parser("eval", help="verification metrics of a model on a labelled trial list")
    p.add_argument("model", help="checkpoint file or pretrained model name (e.g. dlib_resnet)")
    p.add_argument("trials", help="LFW pairs file or img1,img2,label CSV")
    p.add_argument("--images-root", help="where relative image paths resolve")
    p.add_argument("--flip", action="store_true", help="add the mirrored face's embedding")
    p.add_argument("--out", help="folder for metrics.json, roc.png, scores.png")

    p = sub.add_parser("classify", help="top-1/top-5 accuracy on a run's held-out images")
    p.add_argument("checkpoint")
    p.add_argument("--split", choices=("val", "train"), default="val")

    p = sub.add_parser("verify", help="compare two face images (cosine similarity)")
    p.add_argument("model")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--threshold", type=float)
    p.add_argument("--flip", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        COMMANDS[args.command](args)
    except (ImageError, CheckpointError, FileNotFoundError, KeyError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
