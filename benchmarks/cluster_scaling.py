"""How facelab's face clustering grows with the number of faces: 10k, 100k, 1M synthetic
embeddings, time per stage and peak memory.

Synthetic faces: identities are random directions on the 128-d unit sphere; identity sizes
follow LFW's shape (a Zipf law, exponent 2, capped at 500 faces: most people appear once, a few
hundreds of times); a face is its identity's direction plus Gaussian noise of per-dimension
deviation `--noise`, renormalised (noise 0.025 x sqrt(128) gives a genuine-pair cosine of
about 0.93, an impostor cosine near 0). Clustering runs at threshold `--threshold` with the
default configuration (`ClusterConfig`: FAISS flat k-NN up to 200k faces, IVF above, to depth
80; both passes, the second on normalised scores).

Each size runs in its own process so that its peak resident memory (ru_maxrss) is its own. The
pairwise and BCubed F against the synthetic identities are printed as a sanity check, not as a
quality claim (synthetic clusters are easier than faces).

    PYTHONPATH=$PWD/src python3 benchmarks/cluster_scaling.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import numpy as np

DIM = 128


def synthetic_faces(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 128) float32 unit vectors and their identity labels (module docstring)."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.zipf(2.0, n), 500)
    sizes = sizes[np.cumsum(sizes) <= n]
    sizes = np.r_[sizes, np.ones(n - sizes.sum(), np.int64)]  # fill up with single faces
    labels = np.repeat(np.arange(len(sizes)), sizes)
    faces = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):  # in chunks: bounded temporary memory
        lab = labels[start : start + 100_000]
        centres = _centres(lab, seed)  # the same identity gets the same centre in any chunk
        block = centres + rng.standard_normal((len(lab), DIM)) * noise
        faces[start : start + len(lab)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return faces, labels


def _centres(labels: np.ndarray, seed: int) -> np.ndarray:
    """A unit direction per identity, a deterministic function of the label alone."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    out = np.empty((len(uniq), DIM))
    for i, label in enumerate(uniq.tolist()):
        out[i] = np.random.default_rng([seed, label]).standard_normal(DIM)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out[inverse]


def run(n: int, noise: float, threshold: float, queue: multiprocessing.Queue) -> None:
    from facelab.collections.cluster import ClusterConfig, cluster_neighbours, knn
    from facelab.eval.clustering import bcubed_prf, pairwise_prf

    faces, labels = synthetic_faces(n, noise)
    config = ClusterConfig(threshold=threshold)
    tick = time.perf_counter()
    scores, near = knn(faces, config.search_depth, config.index, config.exact_max)
    search = time.perf_counter() - tick
    tick = time.perf_counter()
    found = cluster_neighbours(faces, scores, near, config)
    merge = time.perf_counter() - tick
    queue.put(
        {
            "faces": n,
            "identities": int(labels.max() + 1),
            "knn_s": round(search, 1),
            "merge_s": round(merge, 1),
            "total_s": round(search + merge, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "clusters": int(found.max() + 1),
            "pairwise_f": round(pairwise_prf(found, labels).f, 4),
            "bcubed_f": round(bcubed_prf(found, labels).f, 4),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--noise", type=float, default=0.025)
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(
        "| faces | identities | k-NN | merge | total | peak RSS | clusters | pairwise F | "
        "BCubed F |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        queue = context.Queue()
        worker = context.Process(target=run, args=(n, args.noise, args.threshold, queue))
        worker.start()
        r = queue.get()
        worker.join()
        print(
            f"| {r['faces']:,} | {r['identities']:,} | {r['knn_s']} s | {r['merge_s']} s | "
            f"{r['total_s']} s | {r['peak_rss_mb']:,} MB | {r['clusters']:,} | "
            f"{r['pairwise_f']} | {r['bcubed_f']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
