"""`facelab` command line: a thin layer that parses arguments and calls `facelab.api`."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sqlite3
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from facelab import api
from facelab.data.images import ImageError
from facelab.eval.metrics import finite
from facelab.fileio import atomic_write_text, check_writable, check_writable_folder
from facelab.gallery.store import GalleryError
from facelab.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_model_checkpoint,
)
from facelab.pipeline import INPUT_MODES
from facelab.runtime import set_threads
from facelab.submission import ID_STYLES, SCORE_CHUNK, parse_columns
from facelab.train.config import yaml_problem

log = logging.getLogger("facelab")
GALLERY_HELP = "gallery file, or a postgresql://user@host:port/db address (default gallery.db)"
SERVE_RUNTIME = "onnx"  # `facelab serve`'s embedding runtime unless --runtime says otherwise

COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {}
# Commands that embed faces, so take --detector.
DETECTOR_COMMANDS = (
    "eval",
    "embed",
    "verify",
    "enroll",
    "identify",
    "map",
    "calibrate",
    "eval-identification",
    "score",
    "serve",
    "index",
)


def command(name: str) -> Callable:
    def decorator(fn: Callable[[argparse.Namespace], Any]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return decorator


def _parse_value(pair: str, text: str) -> Any:
    """CLI override values are YAML scalars or lists: 0.1, true, [0.8, 1.0], {flip: true}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {pair}: not a YAML value ({yaml_problem(exc)})") from None


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.replace("-", "_")] = _parse_value(pair, value)
    return out


@command("train")
def _train(args: argparse.Namespace) -> None:
    from facelab.train import TrainConfig, distributed, train

    overrides = _overrides(args.set)
    if args.data:
        overrides["data"] = args.data
    if args.out:
        overrides["out"] = args.out
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.teacher:
        overrides["teacher"] = args.teacher
    if args.smoke:
        if not args.config:
            raise SystemExit("facelab train --smoke: give --config configs/RECIPE.yaml")
        from facelab.recipes import run_smoke

        print(json.dumps(run_smoke(args.config, **overrides), indent=2))
        return
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, **overrides)
    else:
        cfg = TrainConfig.from_dict(overrides, source="command line")
    if not args.resume and not cfg.data:
        raise SystemExit("facelab train: give --data ROOT (or data: in --config)")
    result = train(cfg, resume=args.resume)
    if result.main_process:  # under torchrun only rank 0 reports
        print(
            json.dumps(
                {
                    "checkpoint": str(result.checkpoint),
                    "last": result.history[-1] if result.history else None,
                }
            )
        )
    if distributed.joined_group():
        distributed.exit_process()


@command("eval")
def _eval(args: argparse.Namespace) -> None:
    if args.out:
        check_writable_folder(args.out)
    model = _load_model(args, args.model)
    report = api.evaluate(
        model, args.trials, args.images_root, flip=args.flip, out_dir=args.out, input=args.input
    )
    print(json.dumps(report, indent=2))


@command("models")
def _models(args: argparse.Namespace) -> None:
    models = api.list_models()
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return
    print(
        "| name | kind | input | alignment | embedding | parameters | GFLOPs | LFW View 2 "
        "| threshold at FAR 1e-3 | licence | source |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in models:
        lfw = f"{100 * m.lfw_view2['accuracy']:.2f}%" if m.lfw_view2 else "-"
        points = (m.operating_points or {}).get("points", [])
        at_1e3 = next((f"{p['threshold']:.4f}" for p in points if p["target_far"] == 1e-3), "-")
        print(
            f"| {m.name} | {m.kind} | {m.input} | {m.alignment or '-'} | "
            f"{m.embedding_dim or '-'} | {m.parameters / 1e6:.2f} M | {m.gflops:.3f} | {lfw} | "
            f"{at_1e3} | {m.licence} | {m.source} |"
        )
    for m in models:
        if m.operating_points:
            cal = m.operating_points["calibration"]
            print(
                f"\n{m.name} operating points, calibrated on {cal['trials']} "
                f"({cal['genuine_pairs']:,} genuine, {cal['impostor_pairs']:,} impostor pairs), "
                f"reported on {m.operating_points['report']['trials']}:"
            )
            for p in m.operating_points["points"]:
                report = p["report"]
                print(
                    f"  FAR {p['target_far']:g}: threshold {p['threshold']:.4f}, measured FAR "
                    f"{p['far']:.2e} / FRR {p['frr']:.4f}; on the report list FAR "
                    f"{report['far_all_pairs']:.2e} / FRR {report['frr']:.4f}"
                )
        if m.lfw_view2:
            lfw = m.lfw_view2
            print(f"{m.name} LFW View 2 accuracy: {lfw['command']} ({lfw['date']})")


@command("classify")
def _classify(args: argparse.Namespace) -> None:
    print(json.dumps(api.classify(args.checkpoint, split=args.split)))


@command("embed")
def _embed(args: argparse.Namespace) -> None:
    check_writable(args.out)
    model = _load_model(args, args.model, runtime=args.runtime)
    result = api.embed_directory(
        model,
        args.folder,
        batch_size=args.batch_size,
        flip=args.flip,
        fast=not args.eager,
        skip_bad=args.skip_bad,
        input=args.input,
    )
    api.save_embeddings(result, model, args.out)
    n = len(result.paths)
    total = sum(result.seconds.values())
    print(
        json.dumps(
            {
                "out": args.out,
                "images": n,
                "routes": result.route_counts(),
                "faces_per_s": round(n / max(total, 1e-9), 1),
                "ms_per_face": {k: round(1000 * v / n, 2) for k, v in result.seconds.items()},
                "skipped": [str(p) for p in result.skipped],
            }
        )
    )


@command("verify")
def _verify(args: argparse.Namespace) -> None:
    if args.claim:
        from facelab.gallery import verify_claim

        name, image = args.claim
        claim = verify_claim(
            args.gallery,
            _gallery_model(args),
            name,
            image,
            threshold=args.threshold,
            far=args.far,
            no_face=args.no_face,
        )
        print(
            json.dumps(
                {
                    "identity": claim.identity,
                    "image": claim.image,
                    "score": claim.score,
                    "decision": "accept" if claim.accepted else "reject",
                    "threshold": asdict(claim.threshold),
                    "reason": claim.threshold.describe(),
                }
            )
        )
        return
    if not (args.model and args.a and args.b):
        raise SystemExit("facelab verify: give MODEL A B, or --claim NAME IMAGE")
    model = _load_model(args, args.model)
    result = api.verify(
        model,
        args.a,
        args.b,
        threshold=args.threshold,
        flip=args.flip,
        far=args.far,
        input=args.input,
    )
    print(json.dumps(asdict(result)))


def _model_source(args: argparse.Namespace) -> str:
    """--model as given (a checkpoint as an absolute path), else the source the gallery recorded."""
    from facelab.gallery.backends import gallery_exists, open_store

    if args.model:
        if api.is_model_name(args.model) or not Path(args.model).is_file():
            return args.model
        return str(Path(args.model).resolve())
    if not gallery_exists(args.gallery):
        raise SystemExit(f"{args.gallery}: no gallery yet; give --model to make one")
    with open_store(args.gallery) as store:
        source = store.model_source()
    if source is None:
        raise SystemExit(f"{args.gallery}: the gallery does not record its model; give --model")
    return source


def _gallery_model(args: argparse.Namespace, source: str | None = None, **kwargs: Any) -> Any:
    """The model for a gallery command: `source` (default `_model_source`), with --detector or
    else the detector the gallery's embeddings were made with."""
    from facelab.gallery.backends import gallery_exists, open_store

    model = _load_model(args, source or _model_source(args), **kwargs)
    if args.detector is None and gallery_exists(args.gallery):
        with open_store(args.gallery) as store:
            info = store.model()
        if info is not None:
            model = api.with_detector(model, info.preprocess.get("detector"))
    return model


def _load_model(args: argparse.Namespace, source: str, **kwargs: Any) -> Any:
    """api.load_model with the command's --detector, if it has one."""
    return api.load_model(source, detector=getattr(args, "detector", None), **kwargs)


def _remember_model(args: argparse.Namespace) -> None:
    """After a command that bound the gallery to a model: record where that model comes from,
    so later commands on the gallery need no --model."""
    from facelab.gallery.backends import open_store

    with open_store(args.gallery) as store:
        store.set_model_source(_model_source(args))


@command("enroll")
def _enroll(args: argparse.Namespace) -> None:
    from facelab.gallery import enroll, enroll_tree

    options = {"append": args.append, "all_faces": args.all_faces, "no_face": args.no_face}
    check_writable(args.gallery)
    if args.tree and not args.name and not args.images:
        report = enroll_tree(args.gallery, _gallery_model(args), args.tree, **options)
    elif args.name and args.images and not args.tree:
        report = enroll(args.gallery, _gallery_model(args), args.name, args.images, **options)
    else:
        raise SystemExit("facelab enroll: give --name NAME IMAGE..., or --tree ROOT")
    if report.enrolled:  # else no gallery file was made
        _remember_model(args)
    print(json.dumps(asdict(report)))


@command("identify")
def _identify(args: argparse.Namespace) -> None:
    from facelab.gallery import identify

    results = identify(
        args.gallery,
        _gallery_model(args),
        args.images,
        k=args.k,
        threshold=args.threshold,
        far=args.far,
        method=args.method,
        aggregate=args.aggregate,
        all_faces=args.all_faces,
        no_face=args.no_face,
    )
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["image", "face", "identity", "score", "threshold", "target_far", "top_k"])
        for r in results:
            top = ";".join(f"{m.identity}:{m.score:.4f}" for m in r.candidates)
            writer.writerow(
                [
                    r.image,
                    r.face,
                    r.identity,
                    f"{r.score:.4f}",
                    r.threshold.value,
                    r.threshold.target_far,
                    top,
                ]
            )
    else:
        print(
            json.dumps(
                [r.to_dict() | {"reason": r.threshold.describe()} for r in results], indent=2
            )
        )


@command("map")
def _map(args: argparse.Namespace) -> None:
    from facelab.gallery import map_unknown

    check_writable(args.out)
    result = map_unknown(
        _load_model(args, args.model),
        args.known,
        args.unknown,
        labels=args.labels,
        out=args.out,
        method=args.method,
        aggregate=args.aggregate,
        no_face=args.no_face,
        columns=parse_columns(args.columns),
    )
    print(
        json.dumps(
            {
                "out": args.out,
                "images": len(result.rows),
                "accuracy": result.accuracy,
                "labelled": result.labelled,
            }
        )
    )


@command("gallery")
def _gallery(args: argparse.Namespace) -> None:
    from facelab.gallery.backends import copy_gallery, open_store, prune_log

    if args.gallery_command == "copy":
        print(json.dumps(copy_gallery(args.src, args.dst)))
        return
    with open_store(args.gallery) as store:
        if args.gallery_command == "list":
            for identity in store.identities():
                print(f"{identity.name}\t{identity.images}")
        elif args.gallery_command == "remove":
            print(json.dumps({"removed": args.name, "images": store.remove(args.name)}))
        elif args.gallery_command == "prune-log":
            print(json.dumps(prune_log(store, args.keep)))
        elif args.gallery_command == "rename":
            store.rename(args.old, args.new)
            print(json.dumps({"renamed": args.old, "to": args.new}))
        else:
            print(json.dumps(store.stats(), indent=2))


@command("calibrate")
def _calibrate(args: argparse.Namespace) -> None:
    from facelab.gallery import calibrate

    model = _gallery_model(args)
    check_writable(args.gallery)
    threshold = calibrate(
        args.gallery,
        model,
        args.trials,
        target_far=args.far,
        images_root=args.images_root,
        no_face=args.no_face,
    )
    _remember_model(args)
    print(json.dumps(asdict(threshold) | {"reason": threshold.describe()}))


@command("eval-identification")
def _eval_identification(args: argparse.Namespace) -> None:
    from facelab.gallery import eval_identification, write_lfw_mapping_split

    if args.mapping_split:
        write_lfw_mapping_split(args.lfw, args.mapping_split)
    report = eval_identification(_load_model(args, args.model), args.lfw, out_dir=args.out)
    print(json.dumps(report, indent=2))


@command("predict")
def _predict(args: argparse.Namespace) -> None:
    columns = parse_columns(args.columns)
    check_writable(args.out)
    rows = api.predict_folder(args.checkpoint, args.test_dir, args.out, columns, flip=args.flip)
    print(json.dumps({"out": args.out, "images": len(rows)}))


@command("score")
def _score(args: argparse.Namespace) -> None:
    check_writable(args.out)
    summary = api.score_trial_file(
        _load_model(args, args.model),
        args.trials,
        args.out,
        columns=parse_columns(args.columns),
        id_style=args.id,
        images_root=args.images_root,
        flip=args.flip,
        chunk_size=args.chunk_size,
    )
    print(json.dumps(summary.to_dict()))


@command("data")
def _data(args: argparse.Namespace) -> None:
    if args.data_command == "layout":
        from facelab.data.layout import layout_from_labels

        layout = layout_from_labels(args.src, args.labels, args.dst)
        print(json.dumps(asdict(layout) | {"dest": str(layout.dest)}))
        return
    from facelab.data.check import check_dataset

    pairs = [s.split("=", 1) for s in args.splits or ["all=."]]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit("--splits expects NAME=DIR, e.g. train=train test=test")
    if args.out:
        check_writable(args.out)
    check = check_dataset({name: Path(args.root) / d for name, d in pairs}, args.workers)
    if args.out:
        atomic_write_text(args.out, json.dumps(check.to_dict(), indent=2) + "\n")
    print(json.dumps(check.summary(), indent=2))
    if args.strict and not check.ok:
        raise SystemExit("facelab data check --strict: unreadable files or cross-split duplicates")


def _add_submission_commands(sub: Any) -> None:
    p = sub.add_parser("predict", help="id,label CSV for a flat folder of unlabelled test images")
    p.add_argument("checkpoint", help="classification checkpoint (with its head)")
    p.add_argument("test_dir", help="flat folder of test images")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--columns", default="id,label", help="header of the CSV (default id,label)")
    p.add_argument("--flip", action="store_true", help="add the mirrored face's logits")

    p = sub.add_parser("score", help="cosine score of every trial of an unlabelled list, as CSV")
    p.add_argument("model", help="checkpoint file or pretrained model name")
    p.add_argument("trials", help="img1,img2 CSV or a text file of 'img1 img2' lines")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--columns", default="Id,Category", help="header (default Id,Category)")
    p.add_argument(
        "--id",
        choices=ID_STYLES,
        default="pair",
        help="id column: 'img1 img2' as in the list (default) or the 0-based row number",
    )
    p.add_argument("--images-root", help="where image names resolve (default: the list's folder)")
    p.add_argument("--flip", action="store_true", help="add the mirrored face's embedding")
    p.add_argument("--chunk-size", type=int, default=SCORE_CHUNK, help="trials scored at a time")

    p = sub.add_parser("data", help="check a data set, or lay one out as identity folders")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser(
        "check", help="images per identity, unreadable files, duplicates across splits"
    )
    q.add_argument("root", help="data set folder (an identity folder unless --splits)")
    q.add_argument(
        "--splits",
        nargs="+",
        metavar="NAME=DIR",
        help="splits to check together, DIR relative to ROOT, e.g. train=train val=val test=test",
    )
    q.add_argument("--strict", action="store_true", help="exit 1 on unreadable files or leaks")
    q.add_argument("--out", help="JSON report with every count and file")
    q.add_argument("--workers", type=int, default=2, help="decoding threads")
    q = data_sub.add_parser(
        "layout", help="identity folders of symbolic links from an image,identity CSV"
    )
    q.add_argument("src", help="folder of images")
    q.add_argument("dst", help="identity-folder root to create")
    q.add_argument("--labels", required=True, help="image,identity CSV (image relative to SRC)")


@command("serve")
def _serve(args: argparse.Namespace) -> None:
    from facelab.gallery.search import check_options
    from facelab.serve.app import ServeConfig, run
    from facelab.serve.security import ApiKeys

    if args.library is not None:  # the library file is the served gallery too
        if not Path(args.library).is_file():
            raise SystemExit(f"{args.library}: no library (facelab index PHOTOS --library FILE)")
        args.gallery = args.library
    search_options = dict(args.search_option)
    check_options(args.search, search_options)  # before the model loads
    source = _model_source(args)
    config = ServeConfig(
        gallery=args.gallery,
        library=args.library is not None,
        keys=ApiKeys() if args.insecure_local else ApiKeys.load(args.keys_file),
        insecure_local=args.insecure_local,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_request_pixels=args.max_request_pixels,
        max_side=args.max_side,
        max_faces=args.max_faces,
        request_seconds=args.request_seconds,
        allowed_hosts=tuple(args.allowed_host),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        keep_dir=Path(args.keep_dir) if args.keep_dir else None,
        model_source=source,
        search=args.search,
        snapshot_dir=Path(args.snapshot) if args.snapshot else None,
        search_options=search_options,
    )
    # A server embeds a request's few faces at a time, where onnxruntime is the faster runtime
    # (dlib_resnet at batch 1: 2.4 against 4.2 ms per face; identify p50 23.2 against 30.7 ms
    # with MTCNN, docs/detectors.md).
    runtime = args.runtime or SERVE_RUNTIME
    run(_gallery_model(args, source, runtime=runtime), config, host=args.host, port=args.port)


@command("export")
def _export(args: argparse.Namespace) -> None:
    from facelab.models.export import export_onnx

    check_writable(args.out)
    if args.format == "checkpoint":  # a checkpoint file is read once, for its model and run
        is_file = Path(args.model).is_file() and not api.is_model_name(args.model)
        run = load_checkpoint(args.model) if is_file else None
        model = model_from_checkpoint(run) if run else _load_model(args, args.model)
        print(save_model_checkpoint(args.out, model, run))
        return
    model = _load_model(args, args.model)
    report = export_onnx(model, args.out, opset=args.opset, quantization=args.quantize)
    print(json.dumps(asdict(report)))


def _input_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        choices=INPUT_MODES,
        default="photo",
        help="photo: find each face (default); aligned: images are aligned face crops laid out "
        "like insightface's 112x112 ArcFace crops (any size), no detection",
    )


def _runtime_option(
    p: argparse.ArgumentParser, default: str = "onnx for .onnx models, else torch"
) -> None:
    p.add_argument(
        "--runtime",
        choices=("torch", "onnx"),
        help=f"embed with PyTorch or onnxruntime (default: {default})",
    )


def _add_deployment_commands(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API and browser page over a gallery (keys: FACELAB_API_KEYS or --keys-file)",
        parents=[_model_option()],
    )
    served = p.add_mutually_exclusive_group()
    served.add_argument("--gallery", default="gallery.db", help=GALLERY_HELP)
    served.add_argument(
        "--library",
        help="a photo library (facelab index): served as the gallery, with its People view",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys-file", help="file of ROLE:KEY lines (ro or rw), instead of the env var")
    p.add_argument(
        "--insecure-local",
        action="store_true",
        help="no API key at all, serving on 127.0.0.1 only (a local trial)",
    )
    _runtime_option(p, SERVE_RUNTIME)
    p.add_argument("--max-batch", type=int, default=8, help="dynamic batch size (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="wait to fill a batch")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="request body limit")
    p.add_argument("--max-pixels", type=int, default=24_000_000, help="per image, from its header")
    p.add_argument("--max-request-pixels", type=int, default=100_000_000, help="per request")
    p.add_argument("--max-side", type=int, default=1280, help="longer side detection sees")
    p.add_argument("--max-faces", type=int, default=20, help="faces embedded per image")
    p.add_argument("--request-seconds", type=float, default=60.0, help="time limit per request")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name clients reach the server by, besides localhost (repeatable)",
    )
    p.add_argument("--keep-dir", help="where enrollments with keep_images write them")
    p.add_argument(
        "--search",
        choices=("auto", "exact", "flat", "hnsw", "ivf", "ivfpq"),
        default="auto",
        help="the replica's in-memory index: auto (default: exact up to 100k rows, ivfpq "
        "above), exact, or a FAISS index",
    )
    p.add_argument(
        "--search-option",
        action="append",
        default=[],
        type=_search_option,
        metavar="NAME=VALUE",
        help="an index parameter, e.g. nprobe=256 (repeatable; docs/postgres.md)",
    )
    p.add_argument(
        "--snapshot",
        metavar="DIR",
        help="PostgreSQL galleries: save the replica's index in DIR, so that a restart reads "
        "only the changes since (docs/postgres.md)",
    )

    p = sub.add_parser(
        "export",
        help="export a model to ONNX (preprocessing in its metadata), or as a model-only "
        "checkpoint (no optimizer or head state)",
    )
    p.add_argument("model", help="checkpoint file or pretrained model name (e.g. dlib_resnet)")
    p.add_argument("--format", choices=("onnx", "checkpoint"), default="onnx")
    p.add_argument("--out", required=True, help="the .onnx or .pt file to write")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument(
        "--quantize", choices=("none", "int8"), default="none", help="dynamic int8 weights"
    )


# -- photo collections: index, cluster, people, search -------------------------------------------


def _add_collection_commands(sub: Any) -> None:
    from facelab.collections.indexer import NO_FACE_POLICIES

    library = argparse.ArgumentParser(add_help=False)
    library.add_argument("--library", default="library.db", help="library file (library.db)")

    p = sub.add_parser("index", help="index every face of a folder of photos", parents=[library])
    p.add_argument("photos", help="folder of photos (searched recursively)")
    p.add_argument("--model", default="dlib_resnet", help="checkpoint or pretrained name")
    p.add_argument("--batch-size", type=int, default=32, help="photos per batch and commit")
    p.add_argument(
        "--no-face",
        choices=NO_FACE_POLICIES,
        default="skip",
        help="photo in which no route finds a face: no faces (default), its centre crop "
        "(pre-cropped sets such as LFW) or dlib's landmarks on the whole frame (face crops)",
    )
    _input_option(p)

    p = sub.add_parser("cluster", help="group the library's unnamed faces", parents=[library])
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--threshold",
        type=_finite_float,
        help="cosine threshold (default: the model's operating point for the library's size)",
    )
    group.add_argument(
        "--far", type=_finite_float, help="the library's threshold calibrated for this FAR"
    )
    p.add_argument("--min-quality", type=float, default=0.0, help="faces below stay unclustered")

    p = sub.add_parser(
        "people", help="list, name, merge, split, move, ignore, undo", parents=[library]
    )
    people = p.add_subparsers(dest="people_command", required=True)
    q = people.add_parser("list", help="people (named first) with size and representative face")
    q.add_argument("--min-faces", type=int, default=2)
    q.add_argument("--thumbnails", help="folder to write each representative face's JPEG to")
    q = people.add_parser("show", help="a person's faces")
    q.add_argument("person", help="name or id")
    q = people.add_parser("name", help="name a person (it joins the library's gallery)")
    q.add_argument("person", help="name or id")
    q.add_argument("name")
    q = people.add_parser("merge", help="move every face of OTHER into KEEP")
    q.add_argument("keep")
    q.add_argument("other")
    q = people.add_parser("split", help="move faces out into a new person")
    q.add_argument("faces", type=int, nargs="+", help="face ids")
    q = people.add_parser("move", help="move a face to a person (or out with --none)")
    q.add_argument("face", type=int)
    q.add_argument("person", nargs="?", help="name or id")
    q = people.add_parser("ignore", help="mark a face 'not a face / ignore'")
    q.add_argument("face", type=int)
    people.add_parser("undo", help="undo the last action")

    p = sub.add_parser("search", help="photos of a person, ranked, with boxes", parents=[library])
    probe = p.add_mutually_exclusive_group(required=True)
    probe.add_argument("--face", help="probe photo (its main face)")
    probe.add_argument("--person", help="a person of the library, by name or id")
    _threshold_options(p)
    p.add_argument("--limit", type=int, help="at most this many photos")


@command("index")
def _index(args: argparse.Namespace) -> None:
    from facelab.collections.indexer import IndexConfig

    config = IndexConfig(batch_size=args.batch_size, no_face=args.no_face, input=args.input)
    report = api.index_photos(args.library, args.photos, args.model, config, detector=args.detector)
    print(json.dumps(asdict(report) | {"faces_per_s": round(report.faces_per_s, 1)}))


@command("cluster")
def _cluster(args: argparse.Namespace) -> None:
    report = api.cluster_people(args.library, args.threshold, args.far, args.min_quality)
    print(json.dumps(asdict(report)))


@command("people")
def _people(args: argparse.Namespace) -> None:
    from facelab.collections import people
    from facelab.collections.library import Library

    with Library(args.library) as lib:
        action = args.people_command
        if action == "list":
            found = people.list_people(lib, args.min_faces)
            if args.thumbnails:
                folder = Path(args.thumbnails)
                folder.mkdir(parents=True, exist_ok=True)
                for person in found:
                    (folder / f"{person.id}.jpg").write_bytes(lib.thumbnail(person.representative))
            print(json.dumps({"library": lib.stats(), "people": [asdict(p) for p in found]}))
        elif action == "show":
            table = people.person_faces(lib, args.person)
            print(json.dumps([lib.face_details(int(i)) for i in table.ids]))
        elif action == "name":
            people.name_person(lib, args.person, args.name)
        elif action == "merge":
            people.merge_people(lib, args.keep, args.other)
        elif action == "split":
            print(json.dumps({"person": people.split_person(lib, args.faces)}))
        elif action == "move":
            people.move_face(lib, args.face, args.person)
        elif action == "ignore":
            people.ignore_face(lib, args.face)
        else:
            print(json.dumps({"undone": people.undo(lib)}))


@command("search")
def _search(args: argparse.Namespace) -> None:
    hits = api.search_photos(
        args.library, args.face, args.person, args.threshold, args.far, limit=args.limit
    )
    print(json.dumps([asdict(hit) for hit in hits]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a backbone + head on an identity folder")
    p.add_argument("--config", help="YAML file of TrainConfig fields")
    p.add_argument("--data", help="identity-folder root")
    p.add_argument("--out", help="run folder")
    p.add_argument("--epochs", type=int)
    p.add_argument(
        "--resume", help="continue from this checkpoint (model, optimizer, schedule, RNG)"
    )
    p.add_argument(
        "--teacher",
        metavar="MODEL",
        help="distil this model's embeddings (pretrained name or checkpoint) into the backbone",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override any TrainConfig field, e.g. --set lr=0.05 loss=arcface",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the recipe's few-minute CPU run on LFW (configs/smoke/NAME.yaml over --config), "
        "then its submission files and checks (smoke.json)",
    )

    p = sub.add_parser("eval", help="verification metrics of a model on a labelled trial list")
    p.add_argument("model", help="checkpoint file or pretrained model name (e.g. dlib_resnet)")
    p.add_argument("trials", help="LFW pairs file or img1,img2,label CSV")
    p.add_argument("--images-root", help="where relative image paths resolve")
    p.add_argument("--flip", action="store_true", help="add the mirrored face's embedding")
    p.add_argument("--out", help="folder for metrics.json, roc.png, scores.png")
    _input_option(p)

    p = sub.add_parser("embed", help="embed every image of a folder into an .npz")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="embeddings.npz")
    p.add_argument("--model", default="dlib_resnet", help="checkpoint or pretrained model name")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--flip", action="store_true", help="add the mirrored face's embedding")
    p.add_argument("--eager", action="store_true", help="skip the traced, frozen fast path")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave unreadable files out (listed under 'skipped') instead of stopping at the first",
    )
    _runtime_option(p)
    _input_option(p)

    p = sub.add_parser(
        "models",
        help="every registered model: input, size, GFLOPs, licence, LFW accuracy, operating points",
    )
    p.add_argument("--json", action="store_true", help="JSON output (default: a table)")

    p = sub.add_parser("classify", help="top-1/top-5 accuracy on a run's held-out images")
    p.add_argument("checkpoint")
    p.add_argument("--split", choices=("val", "train"), default="val")

    p = sub.add_parser(
        "verify",
        help="compare two face images (cosine similarity), or check a claim against a gallery",
        parents=[_gallery_options()],
    )
    p.add_argument("model", nargs="?", help="with --claim: default, the gallery's model")
    p.add_argument("a", nargs="?")
    p.add_argument("b", nargs="?")
    p.add_argument(
        "--claim",
        nargs=2,
        metavar=("NAME", "IMAGE"),
        help="1:1: is the face in IMAGE the enrolled NAME?",
    )
    _threshold_options(p)
    p.add_argument("--flip", action="store_true")
    _input_option(p)

    p = sub.add_parser(
        "enroll",
        help="enroll a person from images, or a whole identity-folder tree",
        parents=[_gallery_options(), _model_option()],
    )
    p.add_argument("--name", help="the person's name (with IMAGE...)")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--tree", help="identity-folder root: one sub-folder per person")
    p.add_argument(
        "--append",
        action="store_true",
        help="add images to a name already enrolled (default: refuse)",
    )
    p.add_argument(
        "--all-faces",
        action="store_true",
        help="enroll every face of an image (default: the main, large and central one)",
    )

    p = sub.add_parser(
        "identify",
        help="1:N: top-k enrolled identities of each face, or unknown",
        parents=[_gallery_options(), _model_option(), _search_options()],
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-k", type=_positive_int, default=5, help="candidates per face")
    _threshold_options(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output (default)")
    fmt.add_argument("--csv", action="store_true", help="CSV output")

    p = sub.add_parser(
        "map",
        help="map each unknown image to the known identity it resembles",
        parents=[_search_options()],
    )
    p.add_argument("--model", required=True, help="checkpoint file or pretrained model name")
    p.add_argument("--known", required=True, help="identity-folder root of the known people")
    p.add_argument("--unknown", required=True, help="folder of images to map")
    p.add_argument("--labels", help="image,identity CSV of the true answers: report accuracy")
    p.add_argument("--out", required=True, help="image,identity CSV to write")
    _no_face_option(p, "centre")
    p.add_argument("--columns", default="image,identity", help="header of the CSV")

    p = sub.add_parser("gallery", help="list, remove, rename identities; gallery statistics")
    gallery_sub = p.add_subparsers(dest="gallery_command", required=True)
    gallery_sub.add_parser("list", parents=[_gallery_options()], help="identities and images")
    q = gallery_sub.add_parser("remove", parents=[_gallery_options()], help="delete an identity")
    q.add_argument("name")
    q = gallery_sub.add_parser("rename", parents=[_gallery_options()], help="rename an identity")
    q.add_argument("old")
    q.add_argument("new")
    gallery_sub.add_parser("stats", parents=[_gallery_options()], help="counts, model, thresholds")
    q = gallery_sub.add_parser(
        "copy", help="copy a gallery to an empty one (SQLite file <-> postgresql://...)"
    )
    q.add_argument("src", help="gallery to read (file or postgresql:// address)")
    q.add_argument("dst", help="new or empty gallery to write (file or postgresql:// address)")
    q = gallery_sub.add_parser(
        "prune-log",
        parents=[_gallery_options()],
        help="PostgreSQL: keep the last N revisions of the change log replicas catch up from",
    )
    q.add_argument("--keep", type=int, required=True, help="revisions to keep (every writer)")

    p = sub.add_parser(
        "calibrate",
        help="store the threshold for a target FAR on labelled trials",
        parents=[_gallery_options("centre"), _model_option()],
    )
    p.add_argument("trials", help="LFW pairs file or img1,img2,label CSV")
    p.add_argument("--far", type=_finite_float, default=1e-3, help="target false-accept rate")
    p.add_argument("--images-root", help="where relative image paths resolve")

    p = sub.add_parser(
        "eval-identification",
        help="LFW open-set identification (rank-1/5, DIR@FAR) and mapping accuracy",
    )
    p.add_argument("model", help="checkpoint file or pretrained model name (e.g. dlib_resnet)")
    p.add_argument("--lfw", required=True, help="LFW root (with images/)")
    p.add_argument("--out", help="folder for metrics.json and dir_far.png")
    p.add_argument(
        "--mapping-split",
        metavar="DIR",
        help="also lay out the LFW mapping task there (symlinks) for `facelab map`",
    )
    _add_submission_commands(sub)
    _add_deployment_commands(sub)
    _add_collection_commands(sub)
    for name in DETECTOR_COMMANDS:
        sub.choices[name].add_argument(
            "--detector",
            help="face detector of landmark-aligned models: mtcnn (default), blazeface "
            "(faster; for faces that fill a good part of the photo) or blazeface_full; default: "
            "the model's (a gallery's: the one it was built with)",
        )
    return parser


def _gallery_options(no_face: str = "error") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--gallery", default="gallery.db", help=GALLERY_HELP)
    _no_face_option(p, no_face)
    return p


def _no_face_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--no-face",
        choices=("error", "skip", "centre"),
        default=default,
        help=f"no face found: error, skip the image, or assume a centred face (default {default})",
    )


def _model_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", help="checkpoint or pretrained name (default: the gallery's model)")
    return p


def _search_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--method",
        choices=("exact", "flat", "hnsw", "ivf", "ivfpq", "auto"),
        default="exact",
        help="exact matrix product (default) or a FAISS index",
    )
    p.add_argument(
        "--aggregate",
        choices=("max", "mean"),
        default="max",
        help="identity score: best enrolled image (default) or mean template",
    )
    p.add_argument(
        "--all-faces", action="store_true", help="use every face of an image (default: main one)"
    )
    return p


def _search_option(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not value.strip().isdigit():
        raise argparse.ArgumentTypeError(f"not NAME=INTEGER: {text!r}")
    return name.strip(), int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        return finite(float(text), "the value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _threshold_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--threshold", type=_finite_float, help="decision threshold on cosine similarity"
    )
    group.add_argument(
        "--far",
        type=_finite_float,
        help="decide at this target FAR: the gallery's threshold calibrated for it, else the "
        "model's operating point (default: the gallery's latest calibration, else FAR 1e-3)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    set_threads()
    try:
        COMMANDS[args.command](args)
    except (ImageError, CheckpointError, GalleryError, OSError, KeyError, ValueError) as exc:
        log.error("%s", _one_line(exc))
        return 2
    except sqlite3.Error as exc:  # a disk or permission fault under the gallery's database
        log.error("%s: %s", getattr(args, "gallery", "database"), exc)
        return 2
    return 0


def _one_line(exc: Exception) -> str:
    """An OSError as `FILE: reason` (not `[Errno 28] ...`), anything else as its message."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
