"""Detect -> align -> embed speed of facelab beside dlib (and face_recognition), in ONE run.

Same decoded images for every pipeline (default: the first 500 distinct images of LFW
pairsDevTest.txt; decoding is not timed). Times, per face, medians over `--repeats` runs:
  dlib: HOG detector + 5-point shape model + ResNet descriptor (batch 1, as dlib's API works),
  and dlib's CNN (MMOD) detector alone on the first `--cnn-images` images (it is slow);
  face_recognition.face_encodings (HOG, "small" 5-point model) when it imports;
  facelab: each detector of `--detectors` (MTCNN port, BlazeFace) + alignment (the
  registered five-point template, and dlib's own chip from the 5-point shape-model port) +
  dlib_resnet port, at batch 1 and batch 32, with each embedding runtime of `--runtimes`
  (the traced/frozen TorchScript fast path; onnxruntime, `--runtime onnx`) and with `--eager`
  also the eager model at batch 32; each detector alone at batch 1 and 32; for the embedding
  stage alone also channels_last, onnxruntime, optional torch.compile, and batch sizes 1 to
  64. facelab's MTCNN looks for faces from 40 pixels up (dlib's HOG detector at upsample 0:
  from about 80); `--mtcnn-20` adds a row with facenet-pytorch's 20.
dlib and the facelab pipelines run round by round (A, B, A, B, ...), as do the detectors
alone, so the load of a shared machine falls on each alike. Threads: torch's default (all
cores) unless `--threads` or OMP_NUM_THREADS says otherwise.
Also: cosine agreement of facelab's and dlib's descriptors on the same images, and the
achieved GFLOP/s of each detector and of the embedding against this machine's float32
matmul peak measured in the same run (the better of a reading before and one after the
timings). The last table is issue 23's speed table: dlib, MTCNN pipeline, BlazeFace pipeline;
batch 1 and 32; detector alone and end to end; ratios to dlib; GFLOP/s against the peak.

    python benchmarks/bench_pipeline.py [--images 500] [--repeats 3] [--compile]
        [--cnn-images 10] [--profile] [--detectors mtcnn blazeface] [--mtcnn-20]
        [--runtimes torch onnx] [--eager] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from dlib_reference import DlibPipeline, model_file
from torch.utils.flop_counter import FlopCounterMode

from facelab import load_model
from facelab.data.images import read_image
from facelab.data.trials import read_trials
from facelab.models.face_model import FaceModel
from facelab.models.registry import DETECTORS
from facelab.pipeline import Embedded, embed_images

SHARED = Path(__file__).resolve().parents[2] / "shared"
DLIB = "dlib: HOG + shape model + ResNet (batch 1)"


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul rate: the CPU's practical peak with this torch build and threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def interleaved(
    cases: dict[str, Callable[[], dict[str, float]]], repeats: int
) -> dict[str, dict[str, float]]:
    """Median timings of each case, run round by round (A, B, A, B, ...) so that the load of a
    shared machine falls on all of them alike."""
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in cases}
    for _ in range(repeats):
        for label, case in cases.items():
            runs[label].append(case())
    return {
        label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()
    }


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def import_face_recognition() -> types.ModuleType | None:
    """face_recognition imports face_recognition_models, which needs pkg_resources (gone from
    current setuptools); a two-function stand-in resolving its model files lets it import."""
    if importlib.util.find_spec("face_recognition") is None:
        return None
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda _pkg, name: model_file(Path(name).name)  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    import face_recognition

    return face_recognition


def flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def onnx_runner(model: FaceModel) -> FaceModel:
    """The model embedding with onnxruntime (`load_model(..., runtime="onnx")`)."""
    from facelab.models.export import load_onnx, onnx_bytes

    return load_onnx(onnx_bytes(model))


RUNTIMES = {"torch": FaceModel.for_inference, "onnx": onnx_runner}
RUNTIME_LABELS = {"torch": "fast path", "onnx": "onnxruntime"}


def pipeline_label(detector: str, alignment: str, batch: int, runtime: str) -> str:
    return f"facelab {detector} + {alignment}, batch {batch} ({RUNTIME_LABELS[runtime]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=str(SHARED / "data/lfw/pairsDevTest.txt"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--cnn-images",
        type=int,
        default=10,
        help="time dlib's CNN (MMOD) face detector on this many images (about 1.7 s each)",
    )
    parser.add_argument(
        "--alignment",
        nargs="+",
        choices=("registered", "dlib_chip"),
        default=["registered", "dlib_chip"],
        help="dlib_resnet's registered preprocessing and/or dlib's own chip",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print the top operators of one facelab run"
    )
    parser.add_argument(
        "--detectors",
        nargs="+",
        default=["mtcnn", "blazeface"],
        help="face detectors to time (the first is the reference for the speed-up)",
    )
    parser.add_argument(
        "--mtcnn-20", action="store_true", help="one more row: MTCNN from 20-pixel faces"
    )
    parser.add_argument(
        "--runtimes",
        nargs="+",
        choices=tuple(RUNTIMES),
        default=["torch", "onnx"] if importlib.util.find_spec("onnxruntime") else ["torch"],
        help="embedding runtimes of the facelab pipelines (default: both when onnxruntime "
        "is installed)",
    )
    parser.add_argument(
        "--eager", action="store_true", help="also the eager (untraced) model at batch 32"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = list(dict.fromkeys(p for t in read_trials(args.pairs) for p in (t.a, t.b)))
    images = [read_image(p) for p in paths[: args.images]]
    n = len(images)
    peak = matmul_peak_gflops()
    rows: list[tuple[str, dict[str, float]]] = []

    def record(name: str, runs: list[dict[str, float]]) -> dict[str, float]:
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append((name, med))
        return med

    dlib = DlibPipeline()

    if args.cnn_images:
        cnn = dlib.dlib.cnn_face_detection_model_v1(model_file("mmod_human_face_detector.dat"))
        subset = images[: args.cnn_images]
        runs = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            for img in subset:
                cnn(img, 0)
            ms = 1000 * (time.perf_counter() - tick) / len(subset)
            runs.append({"detect": ms, "total": ms})
        record(f"dlib CNN (MMOD) detector alone, {len(subset)} images", runs)

    face_recognition = import_face_recognition()
    if face_recognition is not None:
        runs = []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            for img in images:
                face_recognition.face_encodings(img)
            runs.append({"total": 1000 * (time.perf_counter() - tick) / n})
        record("face_recognition.face_encodings", runs)

    detectors = {name: DETECTORS.create(name) for name in args.detectors}
    detector = detectors[args.detectors[0]]

    # Detection alone, every detector at batch 1 and 32, interleaved round by round.
    detect_cases = {
        f"{name} detection alone, batch {batch}": (det, batch)
        for name, det in detectors.items()
        for batch in (1, 32)
    }

    def detect_all(det: object, batch: int) -> dict[str, float]:
        tick = time.perf_counter()
        for start in range(0, n, batch):
            det.detect(images[start : start + batch])
        ms = 1000 * (time.perf_counter() - tick) / n
        return {"detect": ms, "total": ms}

    detect_ms = interleaved(
        {label: lambda c=case: detect_all(*c) for label, case in detect_cases.items()},
        args.repeats,
    )

    # End to end: dlib and each facelab pipeline, interleaved round by round.
    results: dict[str, Embedded] = {}
    ref: list[np.ndarray] = []

    def run_dlib() -> dict[str, float]:
        dlib.seconds = dict.fromkeys(dlib.seconds, 0.0)
        tick = time.perf_counter()
        ref[:] = [np.stack([dlib(img) for img in images])]
        total = time.perf_counter() - tick
        return {**{k: 1000 * v / n for k, v in dlib.seconds.items()}, "total": 1000 * total / n}

    def run_facelab(label: str, runner: FaceModel, batch: int, det: object) -> dict[str, float]:
        tick = time.perf_counter()
        out = embed_images(runner, images, batch_size=batch, detector=det, progress=False)
        total = time.perf_counter() - tick
        results[label] = out
        return {
            **{k: 1000 * v / n for k, v in out.seconds.items() if k != "read"},
            "total": 1000 * total / n,
        }

    cases: dict[str, Callable[[], dict[str, float]]] = {DLIB: run_dlib}
    for alignment in args.alignment:
        model = dlib_resnet(alignment)
        runners = {runtime: RUNTIMES[runtime](model) for runtime in args.runtimes}
        for name, det in detectors.items():
            labelled = [
                (pipeline_label(name, alignment, batch, runtime), runner, batch)
                for runtime, runner in runners.items()
                for batch in (1, 32)
            ]
            if args.eager:
                labelled.append((f"facelab {name} + {alignment}, batch 32 (eager)", model, 32))
            for label, runner, batch in labelled:
                cases[label] = lambda a=label, r=runner, b=batch, d=det: run_facelab(a, r, b, d)
    fast = runners["torch"] if "torch" in runners else model.for_inference()
    end_to_end = interleaved(cases, args.repeats)
    dlib_ms = end_to_end[DLIB]
    rows[:0] = [(DLIB, dlib_ms)]
    rows.extend((k, v) for k, v in end_to_end.items() if k != DLIB)
    rows.extend((k, v) for k, v in detect_ms.items())
    ref = ref[0]
    if args.mtcnn_20:
        label = f"facelab mtcnn + {alignment}, batch 32 (fast path), MTCNN from 20 px faces"
        mtcnn_20 = DETECTORS.create("mtcnn", min_face_size=20)
        record(label, [run_facelab(label, fast, 32, mtcnn_20) for _ in range(args.repeats)])

    if args.profile:
        with torch.profiler.profile() as prof:
            embed_images(fast, images[:64], batch_size=32, detector=detector, progress=False)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    # Embedding stage alone: other fast-path candidates, and the batch size.
    spec = model.preprocess
    x = torch.randn(32, 3, spec.size, spec.size)
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "eager": model.backbone,
        "traced+frozen": fast.backbone,
    }
    cl = load_model("dlib_resnet").backbone.to(memory_format=torch.channels_last)
    variants["channels_last"] = lambda t: cl(t.contiguous(memory_format=torch.channels_last))
    if args.compile:
        variants["torch.compile"] = torch.compile(load_model("dlib_resnet").backbone)
    if importlib.util.find_spec("onnxruntime") is not None:
        variants["onnxruntime"] = onnx_runner(model).backbone
    embed_only = {}
    by_batch: dict[str, dict[int, float]] = {"traced+frozen": {}, "onnxruntime": {}}
    with torch.inference_mode():
        for name, fn in variants.items():
            fn(x)
            embed_only[name] = (
                1000 * min(timed(lambda f=fn: f(x)) for _ in range(args.repeats)) / 32
            )
        for size in (1, 8, 16, 32, 64):
            xb = torch.randn(size, 3, spec.size, spec.size)
            for name in by_batch:
                if name in variants:
                    variants[name](xb)
                    fastest = min(
                        timed(lambda f=variants[name], b=xb: f(b)) for _ in range(args.repeats)
                    )
                    by_batch[name][size] = 1000 * fastest / size

    # The peak again after the timings: on a shared machine the first reading can fall in a
    # busy moment (11 GFLOP/s against 24-35 achieved by the embedding in one such run).
    peak = max(peak, matmul_peak_gflops())
    embed_flops = flops_of(lambda: model.backbone(x[:1]))
    detect_flops = {
        name: flops_of(lambda d=det: d.detect(images[:32])) / min(32, n)
        for name, det in detectors.items()
    }
    ref_unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)

    print(
        f"\n{n} LFW images ({Path(args.pairs).name}), {torch.get_num_threads()} torch threads, "
        f"median of {args.repeats} runs; float32 matmul peak {peak:.1f} GFLOP/s\n"
    )
    print(
        "| pipeline | detect ms | align/landmarks ms | embed ms | total ms/face | faces/s "
        "| dlib time / this |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, ms in rows:
        second = ms.get("align", ms.get("landmarks"))
        embed_ms = ms.get("embed", ms.get("descriptor"))
        cells = [f"{v:.1f}" if v is not None else "" for v in (ms.get("detect"), second, embed_ms)]
        print(
            f"| {name} | {' | '.join(cells)} | {ms['total']:.1f} | {1000 / ms['total']:.1f} "
            f"| {dlib_ms['total'] / ms['total']:.2f}x |"
        )
    print(
        "\nembedding stage alone, batch 32, ms/face: "
        + ", ".join(f"{k} {v:.2f}" for k, v in embed_only.items())
    )
    for name, sizes in by_batch.items():
        if sizes:
            print(
                f"{name} embedding by batch size, ms/face: "
                + ", ".join(f"{b}: {v:.2f}" for b, v in sizes.items())
            )
    by_label = dict(rows)
    alignment = args.alignment[-1]
    print(
        f"\nSpeed table ({alignment} alignment; ms per face; GFLOP/s achieved against the "
        f"float32 matmul peak of {peak:.1f} GFLOP/s read in this run, "
        f"{torch.get_num_threads()} torch threads)\n"
    )
    print(
        "| pipeline | batch | detector alone ms | end to end ms | dlib time / this "
        "| detector GFLOP/s | embedding GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {DLIB.split(' (')[0]} | 1 | {dlib_ms['detect']:.1f} | {dlib_ms['total']:.1f} "
        f"| 1.00x | | |"
    )
    for name in detectors:
        for runtime in args.runtimes:
            for batch in (1, 32):
                alone = by_label[f"{name} detection alone, batch {batch}"]["detect"]
                ms = by_label[pipeline_label(name, alignment, batch, runtime)]
                print(
                    f"| facelab {name} ({RUNTIME_LABELS[runtime]}) | {batch} | {alone:.1f} "
                    f"| {ms['total']:.1f} | {dlib_ms['total'] / ms['total']:.2f}x "
                    f"| {detect_flops[name] / alone / 1e6:.1f} "
                    f"| {embed_flops / ms['embed'] / 1e6:.1f} |"
                )
    print(
        "\nArithmetic per face: "
        + ", ".join(f"{k} {v / 1e9:.3f} GFLOP" for k, v in detect_flops.items())
        + f", dlib_resnet {embed_flops / 1e9:.3f} GFLOP"
    )
    first = args.detectors[0]
    for name in args.detectors[1:]:
        speedups = [
            by_label[f"{first} detection alone, batch {b}"]["detect"]
            / by_label[f"{name} detection alone, batch {b}"]["detect"]
            for b in (1, 32)
        ]
        print(
            f"{name}: detection {speedups[0]:.2f}x (batch 1) and {speedups[1]:.2f}x (batch 32) "
            f"faster than {first} (target 5x)"
        )
        for runtime in args.runtimes:
            end = [
                dlib_ms["total"] / by_label[pipeline_label(name, alignment, b, runtime)]["total"]
                for b in (1, 32)
            ]
            print(
                f"{name} + {RUNTIME_LABELS[runtime]}: end to end {end[0]:.2f}x (batch 1, "
                f"target 8x) and {end[1]:.2f}x (batch 32, target 15x) faster than dlib"
            )
    found = np.array(dlib.found[:n])  # the first timed round's images, in order
    for label, out in results.items():
        if "batch 32 (" not in label or "eager" in label or "20 px" in label:
            continue
        cos = np.einsum("ij,ij->i", out.embeddings, ref_unit)
        print(
            f"descriptor cosine {label} vs dlib on the same images: mean "
            f"{cos.mean():.4f}, median {np.median(cos):.4f}, min {cos.min():.4f}; mean over "
            f"the {int(found.sum())} images where dlib's HOG found a face "
            f"{cos[found].mean():.4f}; no face: facelab {out.route_counts()}, dlib "
            f"{n - int(found.sum())}"
        )


def dlib_resnet(alignment: str) -> FaceModel:
    """The imported dlib ResNet with its registered preprocessing, or with dlib's own chip."""
    if alignment == "dlib_chip":
        return load_model("dlib_resnet_chip")
    return load_model("dlib_resnet")


if __name__ == "__main__":
    main()
