"""Gallery search at scale: exact matrix product vs FAISS flat, HNSW and IVF indexes.

Galleries of 10k, 100k and 1M synthetic unit vectors (128-d as dlib's ResNet, 512-d as most
ArcFace models). Each query is a noisy copy of a random gallery vector (cosine `--mate-cosine`,
default 0.8, to its mate: roughly a genuine face pair), so "the right answer" exists as it does
for real probes. Uniformly random vectors have no cluster structure, so this is a hard case for
the approximate indexes: recall on real, clustered face embeddings is usually higher.

For every (size, dim, method): build time, memory held by the index (the vectors for exact
search, FAISS's serialised index: vectors plus graph or lists), query latency p50/p99 for
batches of 1 and 64 queries (per batch), and recall@1 against exact search. FAISS and BLAS use
`--threads` threads (default 1: the machine is shared).

    python benchmarks/bench_gallery.py                       # 10k, 100k, 1M x 128 and 512
    python benchmarks/bench_gallery.py --sizes 10000 --dims 128 --methods exact hnsw

HNSW build time grows fastest (about 40 minutes for 1M x 128 on one core): `--hnsw-max` skips
it when size x dim exceeds a bound (default 100k x 512), so the full run takes minutes.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from facelab.gallery.search import ExactIndex, FaissIndex, build_index


def index_bytes(index: ExactIndex | FaissIndex) -> int:
    if isinstance(index, ExactIndex):
        return index.vectors.nbytes
    import faiss

    return faiss.serialize_index(index.index).nbytes


def unit_vectors(n: int, dim: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 unit vectors, generated in chunks to bound peak memory."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def mated_queries(
    gallery: np.ndarray, n: int, rng: np.random.Generator, cosine: float
) -> np.ndarray:
    """Noisy copies of random gallery rows with about `cosine` similarity to their mate."""
    dim = gallery.shape[1]
    mates = gallery[rng.choice(len(gallery), n, replace=False)]
    sigma = np.sqrt((1 / cosine**2 - 1) / dim)  # |noise|^2 = 1/c^2 - 1 gives cos = c
    noisy = mates + rng.standard_normal(mates.shape, dtype=np.float32) * sigma
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def latencies(index, queries: np.ndarray, batch: int, repeats: int) -> np.ndarray:
    """Seconds per search call of `batch` queries."""
    times = []
    for r in range(repeats):
        q = queries[(r * batch) % len(queries) :][:batch]
        start = time.perf_counter()
        index.search(q, 1)
        times.append(time.perf_counter() - start)
    return np.array(times)


def bench(size: int, dim: int, methods: list[str], args: argparse.Namespace) -> list[dict]:
    rng = np.random.default_rng(size + dim)
    vectors = unit_vectors(size, dim, rng)
    queries = mated_queries(vectors, args.queries, rng, args.mate_cosine)
    rows, truth = [], None
    for method in methods:
        if method == "hnsw" and size * dim > args.hnsw_max:
            rows.append({"n": size, "dim": dim, "method": method, "skipped": True})
            continue
        start = time.perf_counter()
        index = build_index(vectors, method)
        build = time.perf_counter() - start
        memory = index_bytes(index)
        _, found = index.search(queries, 1)
        if truth is None and method == "exact":
            truth = found[:, 0]
        one = latencies(index, queries, 1, args.repeats)
        many = latencies(index, queries, 64, max(3, args.repeats // 10))
        rows.append(
            {
                "n": size,
                "dim": dim,
                "method": method,
                "build_s": build,
                "memory_mb": memory / 2**20,
                "p50_1": np.percentile(one, 50) * 1e3,
                "p99_1": np.percentile(one, 99) * 1e3,
                "p50_64": np.percentile(many, 50) * 1e3,
                "p99_64": np.percentile(many, 99) * 1e3,
                "recall": float(np.mean(found[:, 0] == truth))
                if truth is not None
                else float("nan"),
            }
        )
        del index
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| gallery | dim | method | build s | index MB | batch 1 p50 / p99 ms | "
        "batch 64 p50 / p99 ms | recall@1 vs exact |"
    )
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        head = f"| {r['n']:,} | {r['dim']} | {r['method']} |"
        if r.get("skipped"):
            print(f"{head} skipped (--hnsw-max) | | | | |")
            continue
        one = f"{r['p50_1']:.2f} / {r['p99_1']:.2f}"
        many = f"{r['p50_64']:.1f} / {r['p99_64']:.1f}"
        cost = f"{r['build_s']:.1f} | {r['memory_mb']:.0f}"
        print(f"{head} {cost} | {one} | {many} | {r['recall']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--methods", nargs="+", default=["exact", "flat", "hnsw", "ivf"])
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@1")
    parser.add_argument("--repeats", type=int, default=100, help="batch-1 searches timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mate-cosine", type=float, default=0.8)
    parser.add_argument(
        "--hnsw-max",
        type=int,
        default=512 * 100_000,
        help="skip HNSW when size x dim exceeds this",
    )
    args = parser.parse_args()
    import faiss
    import threadpoolctl

    faiss.omp_set_num_threads(args.threads)
    rows = []
    with threadpoolctl.threadpool_limits(args.threads):
        for dim in args.dims:
            for size in args.sizes:
                rows.extend(bench(size, dim, args.methods, args))
    print_table(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"\npeak resident memory {peak:.0f} MB; {args.threads} thread(s); "
        f"faiss {faiss.__version__}; defaults: HNSW M=32 efConstruction=40 efSearch=64, "
        f"IVF nlist=sqrt(N) nprobe=32; mate cosine {args.mate_cosine}"
    )


if __name__ == "__main__":
    main()
