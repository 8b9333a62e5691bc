"""Training configuration: one dataclass, loadable from YAML and overridable from the CLI."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from facelab.data.augment import Augment

DISTILL_LOSSES = ("cosine", "mse")


def read_options(path: str | Path) -> dict[str, Any]:
    """The mapping of training options in a YAML file (not yet checked against the fields)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        where = yaml_error_where(exc)
        raise ValueError(f"{path}:{where} not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of training options")
    return data


def yaml_error_where(exc: yaml.YAMLError) -> str:
    """`LINE:COLUMN:` of a YAML syntax error (1-based), or nothing when YAML does not say."""
    mark = getattr(exc, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""


def yaml_problem(exc: yaml.YAMLError) -> str:
    return getattr(exc, "problem", None) or type(exc).__name__


def _expected(hint: Any) -> str:
    """How an error message names a type hint: `an integer`, `a list of strings`, ..."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    if origin is list:
        return f"a list of {_expected(args[0])[2:]}s" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_expected(a) for a in args)})"
    if origin is dict or hint is dict:
        return "a mapping"
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def checked_fields(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`values` for the fields of dataclass `cls`, each checked against (and converted to) its
    type hint; an unknown name or a value of another type is a ValueError naming the field
    (`prefix` + name), the type expected and the value given."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        what = prefix.rstrip(".") or cls.__name__
        raise ValueError(
            f"unknown {what} option(s): {', '.join(map(str, unknown))} (known: {', '.join(hints)})"
        )
    out = {}
    for key, value in values.items():
        try:
            out[key] = _coerce(value, hints[key])
        except TypeError:
            expected = _expected(hints[key])
            raise ValueError(f"{prefix}{key} must be {expected}, not {value!r}") from None
    return out


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as the type hint `hint` asks (an int for a float field becomes a float; a float
    field also takes a numeric string, since YAML 1.1 reads `1e-3` as one); TypeError if it
    does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except TypeError:
                    pass
        raise TypeError
    if origin is list and isinstance(value, list):
        return [_coerce(v, args[0]) for v in value]
    if origin is tuple and isinstance(value, list | tuple) and len(value) == len(args):
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict and isinstance(value, dict):
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and not isinstance(value, bool) and isinstance(value, int | float | str):
        try:
            number = float(value)
        except ValueError:
            raise TypeError from None
        if math.isfinite(number):
            return number
    if hint is str and isinstance(value, str | os.PathLike):
        return os.fspath(value)
    raise TypeError


@dataclass
class TrainConfig:
    """Everything a training run needs; `facelab train --config X.yaml --key value` fills it."""

    data: str = ""  # identity-folder root (one sub-folder per person)
    out: str = "runs/train"  # checkpoints, metrics.jsonl/csv, plots
    backbone: str = "mobilefacenet"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    # softmax, arcface, cosface (a registered head + cross-entropy) or triplet-batch-all,
    # triplet-batch-hard, triplet-semi-hard (FaceNet triplet loss with online mining)
    loss: str = "softmax"
    head_options: dict[str, Any] = field(default_factory=dict)  # e.g. {margin: 0.3}
    center_loss: float = 0.0  # weight of the auxiliary center loss (0: off)
    images_per_identity: int = 0  # K of P x K batches (P = batch_size / K); 0: shuffled batches
    collapse_steps: int = 50  # stop when embeddings stay collapsed this many steps (0: never)
    init_from: str | None = None  # pretrained backbone name (dlib_resnet) or checkpoint path
    trainable_blocks: int | None = None  # freeze all but the backbone's last N blocks
    embedding_dim: int = 512
    image_size: int = 112
    crop: float = 0.6  # centre-crop fraction before resizing (0.6: LFW deep-funneled)
    # centre_crop, or five_point: MTCNN landmarks warped onto insightface's template (scaled to
    # image_size), detected once while the face cache is built; `crop` is then the fallback
    # region where no face is found; or teacher: the teacher's own preprocessing scaled to
    # image_size, so the teacher can embed every augmented batch online (`distill`)
    alignment: str = "centre_crop"
    min_images: int = 2  # identities with fewer images are left out
    exclude_people: list[str] = field(
        default_factory=list
    )  # people lists / trial lists to leave out
    # people lists / trial lists to train on (empty: every identity not excluded)
    include_people: list[str] = field(default_factory=list)
    # knowledge distillation: reproduce this model's embeddings (pretrained name or checkpoint);
    # the student's embedding_dim must equal the teacher's
    teacher: str | None = None
    distill_loss: str = "cosine"  # cosine | mse (raw student vs unit teacher embedding)
    centre_targets: bool = True  # subtract the teacher's mean training embedding from targets
    identity_weight: float = 0.0  # with a teacher: weight of the `loss` term on labels (0: unused)
    val_fraction: float = 0.1  # images per identity held out for classification accuracy
    val_trials: str | None = None  # trial list for per-epoch verification AUC
    batch_size: int = 64
    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"  # cosine | warm_restarts | constant
    t0: int = 10  # warm restarts: first period in epochs
    t_mult: int = 2  # warm restarts: period multiplier
    eta_min: float = 1e-5
    warmup_epochs: float = 0.0  # linear learning-rate warm-up
    augment: dict[str, Any] = field(default_factory=dict)  # facelab.data.augment.Augment fields
    cutmix: float = 0.0  # probability of applying CutMix to a batch
    cutmix_alpha: float = 1.0
    amp: bool = True  # bfloat16/float16 autocast, used only on CUDA
    seed: int = 0
    workers: int = 2  # threads decoding faces into the cache
    loader_workers: int = 0  # processes preparing (augmenting) batches; 0: the training process
    cache_dir: str | None = None  # memory-mapped decoded-face cache
    max_minutes: float | None = None  # stop after the epoch that crosses this wall-clock budget
    log_every: int = 20

    def __post_init__(self) -> None:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in checked_fields(type(self), fields).items():
            setattr(self, name, value)
        checked_fields(Augment, self.augment, "augment.")  # checked here, built by training
        if self.scheduler not in ("cosine", "warm_restarts", "constant"):
            raise ValueError(
                f"scheduler must be cosine, warm_restarts or constant, not {self.scheduler!r}"
            )
        for name in ("batch_size", "epochs", "image_size", "embedding_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.images_per_identity and self.batch_size % self.images_per_identity:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of images_per_identity "
                f"{self.images_per_identity}"
            )
        if self.loss.startswith("triplet"):
            if self.images_per_identity < 2:
                raise ValueError(
                    "triplet losses mine positives within the batch: set images_per_identity "
                    "(K of P x K batches) to 2 or more"
                )
            if self.cutmix > 0:
                raise ValueError("cutmix mixes identities, which triplet losses cannot use")
        if self.trainable_blocks is not None and self.trainable_blocks < 0:
            raise ValueError(f"trainable_blocks must be >= 0, not {self.trainable_blocks}")
        if self.alignment not in ("centre_crop", "five_point", "teacher"):
            raise ValueError(
                f"alignment must be centre_crop, five_point or teacher, not {self.alignment!r}"
            )
        if self.alignment == "teacher" and not self.teacher:
            raise ValueError("alignment: teacher needs a teacher")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(
                f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}, "
                f"not {self.distill_loss!r}"
            )
        if self.identity_weight < 0:
            raise ValueError(f"identity_weight must be >= 0, not {self.identity_weight}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        return cls.from_dict({**read_options(path), **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((key for key in data if key not in known), key=str)  # None: a YAML `:`
        if unknown:
            names = ", ".join(map(str, unknown))
            raise ValueError(f"{source}: unknown training option(s): {names}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
