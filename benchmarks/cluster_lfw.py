"""Face clustering on all 13,233 LFW images: facelab's clustering beside the baselines.

Input: the embeddings of `facelab embed` (one face per image, dlib_resnet by default), or a
library of LFW's images made by `facelab index ... --no-face centre` (its main faces, with
their quality, for `--min-quality`):

    PYTHONPATH=$PWD/src python3 -m facelab embed ../shared/data/lfw/images --out runs/lfw_all.npz
    PYTHONPATH=$PWD/src python3 benchmarks/cluster_lfw.py runs/lfw_all.npz

Labels are the LFW names (the image's folder); they are used only to score. facelab's
threshold is what `facelab cluster` takes: the model's shipped operating point at FAR =
`--per-face-far` / N (default `FALSE_MATCHES_PER_FACE`: expected false matches per face among N
faces), interpolated in log FAR (`clustering_threshold`; the points were measured on every pair
of distinct images of LFW View 1 pairsDevTrain by calibrate_pretrained.py). `--calibrate`
measures it on these embeddings' pairsDevTrain images instead (for embeddings no model ships
points for, e.g. `facelab embed --flip`); or `--far`, or `--threshold`. No LFW clustering label
picks it. facelab runs as configured (normalised scores) and with raw cosines
(`normalise=False`). `--people peopleDevTest.txt` restricts the faces to one of View 1's
people lists. The baselines are swept over thresholds and shown at their best (oracle)
pairwise-F and BCubed-F thresholds, which a user cannot know:

- dlib `chinese_whispers_clustering` (all pairs within a Euclidean distance; cosine c is
  distance sqrt(2 - 2c) on unit vectors);
- scikit-learn agglomerative clustering, average linkage, cosine distance;
- Chinese Whispers and Leiden (leidenalg, modularity) on facelab's k-NN graph, edges at cosine
  >= the threshold;
- HDBSCAN (scikit-learn), min_cluster_size 2, noise as singletons;
- approximate rank-order clustering (Otto et al. 2017) on the k-NN lists.

Prints one table row per method and threshold: pairwise P/R/F, BCubed P/R/F, clusters, seconds.
Each method runs with the BLAS/FAISS threads the machine gives (`OMP_NUM_THREADS`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from facelab.collections.cluster import (
    FALSE_MATCHES_PER_FACE,
    ClusterConfig,
    cluster_embeddings,
    knn_pairs,
)
from facelab.collections.service import clustering_threshold
from facelab.data.trials import read_lfw_pairs, read_people
from facelab.eval.clustering import clustering_report
from facelab.eval.metrics import tpr_at_fpr
from facelab.models.operating_points import pretrained_operating_points

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"


def load(npz: Path) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    with np.load(npz) as data:
        paths = [str(p) for p in data["paths"]]
        emb = data["embeddings"].astype(np.float32)
        model = str(data["model"]) if "model" in data.files else "dlib_resnet"
    names = np.array([Path(p).parent.name for p in paths])
    return emb, np.unique(names, return_inverse=True)[1], paths, model


def load_library(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """The main face (face 0) of every photo of a library made by `facelab index` of LFW's
    images folder: embeddings, labels, paths, and face quality."""
    from facelab.collections.library import Library

    with Library(path) as library:
        table = library.faces("f.face = 0")
    names = np.array([Path(p).parent.name for p in table.file_paths])
    labels = np.unique(names, return_inverse=True)[1]
    return table.embeddings, labels, table.file_paths, table.quality


def calibration_scores(
    emb: np.ndarray, paths: list[str], pairs: Path
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, same-person labels) of every pair of distinct images named in the pair list
    (View 1 pairsDevTrain: about 4,000 images, 8 million pairs), so that false-accept rates
    down to 1e-6 are measurable; the list's own 1,100 impostor pairs only reach 1e-3."""
    row = {str(Path(p).resolve()): i for i, p in enumerate(paths)}
    trials = read_lfw_pairs(pairs, pairs.parent / "images")
    images = sorted({row[str(Path(p).resolve())] for t in trials for p in (t.a, t.b)})
    names = np.array([Path(paths[i]).parent.name for i in images])
    sub = emb[images]
    upper = np.triu_indices(len(images), 1)
    return (sub @ sub.T)[upper], (names[:, None] == names[None])[upper]


def operating_point(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The cosine threshold at false-accept rate `far` on the calibration pairs."""
    return tpr_at_fpr(scores, same, far)[1]


def _singletons(labels: np.ndarray) -> np.ndarray:
    """Unclustered faces (-1) as clusters of their own, for scoring."""
    out = labels.copy()
    alone = out < 0
    out[alone] = out.max(initial=-1) + 1 + np.arange(alone.sum())
    return out


def dlib_whispers(emb: np.ndarray, cosine: float) -> np.ndarray:
    import dlib

    vectors = [dlib.vector(row.astype(np.float64).tolist()) for row in emb]
    return np.array(dlib.chinese_whispers_clustering(vectors, float(np.sqrt(2 - 2 * cosine))))


def agglomerative(emb: np.ndarray, cosine: float) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    model = AgglomerativeClustering(
        n_clusters=None, metric="cosine", linkage="average", distance_threshold=1 - cosine
    )
    return model.fit_predict(emb)


def _edges(emb: np.ndarray, cosine: float, k: int) -> tuple[np.ndarray, ...]:
    i, j, s = knn_pairs(emb, k)
    keep = s >= cosine
    return i[keep], j[keep], s[keep]


def knn_whispers(emb: np.ndarray, cosine: float, k: int = 20, rounds: int = 20) -> np.ndarray:
    """Weighted Chinese Whispers (Biemann 2006) on the thresholded k-NN graph, random order."""
    i, j, s = _edges(emb, cosine, k)
    n = len(emb)
    neighbours: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    for a, b, w in zip(i.tolist(), j.tolist(), s.tolist(), strict=True):
        neighbours[a].append((b, w))
        neighbours[b].append((a, w))
    labels = list(range(n))
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        changed = 0
        for v in rng.permutation(n).tolist():
            if not neighbours[v]:
                continue
            votes: dict[int, float] = {}
            for u, w in neighbours[v]:
                votes[labels[u]] = votes.get(labels[u], 0.0) + w
            best = max(votes, key=votes.__getitem__)
            changed += best != labels[v]
            labels[v] = best
        if not changed:
            break
    return np.array(labels)


def leiden(emb: np.ndarray, cosine: float, k: int = 20) -> np.ndarray:
    import igraph
    import leidenalg

    i, j, s = _edges(emb, cosine, k)
    graph = igraph.Graph(n=len(emb), edges=np.stack([i, j], 1).tolist())
    graph.es["weight"] = s.tolist()
    part = leidenalg.find_partition(
        graph, leidenalg.ModularityVertexPartition, weights="weight", seed=0
    )
    return np.array(part.membership)


def hdbscan(emb: np.ndarray, _: float) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    labels = HDBSCAN(min_cluster_size=2, min_samples=1).fit_predict(emb)
    noise = labels < 0
    labels[noise] = labels.max() + 1 + np.arange(noise.sum())
    return labels


def rank_order(emb: np.ndarray, cutoff: float, k: int = 20) -> np.ndarray:
    """Approximate rank-order clustering (Otto et al. 2017): link a and b (b among a's k
    nearest) when their rank-order distance D(a, b) < cutoff, then take connected components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from facelab.gallery.search import build_index

    n = len(emb)
    _, rows = build_index(emb, "flat").search(emb, k + 1)
    top = [set(r.tolist()) for r in rows]
    position = [{v: p for p, v in enumerate(r.tolist())} for r in rows]

    def d(a: int, b: int) -> int:
        return sum(1 for f in rows[a, : position[a][b]].tolist() if f not in top[b])

    links = []
    for a in range(n):
        for b in rows[a, 1:].tolist():
            if a in position[b]:
                denom = min(position[a][b], position[b][a])
                if denom and (d(a, b) + d(b, a)) / denom < cutoff:
                    links.append((a, b))
    if not links:
        return np.arange(n)
    i, j = np.array(links).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def score(
    name: str, fn: Callable[[], np.ndarray], truth: np.ndarray, setting: str
) -> dict[str, object]:
    tick = time.perf_counter()
    labels = fn()
    seconds = time.perf_counter() - tick
    report = clustering_report(labels, truth)
    return {"method": name, "setting": setting, "seconds": round(seconds, 2), **report}


def row(r: dict) -> str:
    pw, b3 = r["pairwise"], r["bcubed"]
    return (
        f"| {r['method']} | {r['setting']} | {pw['precision']:.3f} / {pw['recall']:.3f} / "
        f"**{pw['f']:.3f}** | {b3['precision']:.3f} / {b3['recall']:.3f} / **{b3['f']:.3f}** | "
        f"{r['clusters']:,} | {r['seconds']:.1f} s |"
    )


def best(results: list[dict], method: str) -> list[dict]:
    """The rows of `method` at its best pairwise F and its best BCubed F."""
    mine = [r for r in results if r["method"] == method]
    picks = [max(mine, key=lambda r: r["pairwise"]["f"]), max(mine, key=lambda r: r["bcubed"]["f"])]
    return [p for n, p in enumerate(picks) if p not in picks[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", type=Path)
    parser.add_argument("--pairs", type=Path, default=LFW / "pairsDevTrain.txt")
    parser.add_argument(
        "--per-face-far",
        type=float,
        default=FALSE_MATCHES_PER_FACE,
        help="facelab's threshold: the FAR at which a face among N has this many expected false "
        "matches (FAR = this / N)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the operating point on these embeddings' pairsDevTrain images instead "
        "of the model's shipped points",
    )
    parser.add_argument("--far", type=float, help="facelab's threshold at this FAR instead")
    parser.add_argument("--threshold", type=float, help="facelab's threshold, given")
    parser.add_argument(
        "--min-quality",
        type=float,
        nargs="*",
        default=[0.0],
        help="quality gates to try (EMBEDDINGS a library .db from facelab index)",
    )
    parser.add_argument("--people", type=Path, help="only these people (e.g. peopleDevTest.txt)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument(
        "--baselines",
        nargs="*",
        default=["dlib", "agglomerative", "whispers", "leiden", "hdbscan", "rank_order"],
    )
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.92, 0.93, 0.94, 0.95, 0.96])
    parser.add_argument("--out", type=Path, help="write every row as JSON here")
    args = parser.parse_args()

    quality = None
    model = "dlib_resnet"
    if args.embeddings.suffix == ".db":
        emb, truth, paths, quality = load_library(args.embeddings)
    else:
        emb, truth, paths, model = load(args.embeddings)
    if args.threshold is None and (args.calibrate or args.far is not None):
        scores, same = calibration_scores(emb, paths, args.pairs)
    if args.people:
        keep = np.isin([Path(p).parent.name for p in paths], read_people(args.people))
        emb, truth, paths = (
            emb[keep],
            np.unique(truth[keep], return_inverse=True)[1],
            [p for p, k in zip(paths, keep, strict=True) if k],
        )
        quality = None if quality is None else quality[keep]
    if args.threshold is not None:
        threshold, source = args.threshold, "given"
    elif args.calibrate or args.far is not None:
        far = args.far if args.far is not None else args.per_face_far / len(emb)
        threshold = operating_point(scores, same, far)
        source = (
            f"FAR {far:.3g} on all {int(same.sum()):,} genuine and {int((~same).sum()):,} "
            f"impostor pairs of {args.pairs.name} images"
        )
    else:
        chosen = clustering_threshold(
            pretrained_operating_points(model), len(emb), model, args.per_face_far
        )
        threshold, source = chosen.value, chosen.source
    print(
        f"{len(emb):,} faces, {len(np.unique(truth)):,} people; threshold {threshold:.4f} "
        f"({source})"
    )
    results = []
    for gate in args.min_quality if quality is not None else [0.0]:
        for normalise in (True, False):
            config = ClusterConfig(
                threshold=threshold, k=args.k, min_quality=gate, normalise=normalise
            )
            name = "facelab" + ("" if normalise else ", raw cosines")
            results.append(
                score(
                    name + (f", quality >= {gate:g}" if gate else ""),
                    lambda c=config: _singletons(cluster_embeddings(emb, c, quality)),
                    truth,
                    f"{threshold:.4f}",
                )
            )
            print(json.dumps(results[-1]), flush=True)
    sweeps = {
        "dlib": ("dlib chinese_whispers_clustering", dlib_whispers, args.sweep),
        "agglomerative": ("scikit-learn agglomerative (average)", agglomerative, args.sweep),
        "whispers": ("Chinese Whispers on k-NN graph", knn_whispers, args.sweep),
        "leiden": ("Leiden (modularity) on k-NN graph", leiden, args.sweep),
        "hdbscan": ("HDBSCAN (scikit-learn)", hdbscan, [0.0]),
        "rank_order": ("rank-order (Otto et al.)", rank_order, [0.2, 0.4, 0.6, 0.8, 1.2, 1.6]),
    }
    for key in args.baselines:
        name, fn, settings = sweeps[key]
        for value in settings:
            results.append(score(name, lambda fn=fn, v=value: fn(emb, v), truth, f"{value:g}"))
            print(json.dumps(results[-1]), flush=True)
    print(
        "\n| method | cosine threshold | pairwise P / R / F | BCubed P / R / F | clusters | time |"
    )
    print("|---|---|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in results):
        for r in best(results, method):
            print(row(r))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
