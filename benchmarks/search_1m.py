"""1:N search at a million identities on real-like embeddings: query latency p50/p99 and recall@1
against exact search, for FAISS IVF (and HNSW where its build fits the time) over a sweep of
their search parameters.

Real-like embeddings: dlib's ResNet (128-d) embeds LFW people with at least `--min-images`
photos (cached in runs/). Their per-person means give the between-identity distribution (mean
and full covariance) and their residuals from those means the within-identity variation of
real photo pairs. A synthetic identity is a centroid drawn from that Gaussian; its enrolled
embedding and its probe are the centroid plus two different real residuals (renormalised). So
the gallery has the anisotropic spectrum of real embeddings and each probe differs from its
mate as a second real photo does, which uniform random vectors (bench_gallery.py) do not.

    python benchmarks/search_1m.py                             # 1M, IVF sweep
    python benchmarks/search_1m.py --nlist --sq8-nlist 1024 4096 --nprobe 64 128 256 512
    python benchmarks/search_1m.py --nlist --hnsw --ef-search 64 128 256 512 1024

Latency is per single query (batch of 1), one thread (`--threads`), on a shared machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from facelab.gallery.search import ExactIndex, FaissIndex

ROOT = Path(__file__).resolve().parents[1]
LFW = ROOT.parent / "shared" / "data" / "lfw" / "images"


def real_embeddings(cache: Path, min_images: int, per_person: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, person labels) of dlib's ResNet on LFW, computed once and cached."""
    if cache.is_file():
        with np.load(cache) as data:
            return data["embeddings"], data["labels"]
    from facelab import api

    model = api.load_model("dlib_resnet")
    paths, labels = [], []
    for person in sorted(p for p in LFW.iterdir() if p.is_dir()):
        images = sorted(person.glob("*.jpg"))
        if len(images) >= min_images:
            paths += images[:per_person]
            labels += [len(set(labels))] * len(images[:per_person])
    start = time.perf_counter()
    embeddings = api.embed(model, paths)
    print(f"embedded {len(paths)} LFW images in {time.perf_counter() - start:.0f} s")
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, embeddings=embeddings.astype(np.float32), labels=np.array(labels))
    return embeddings, np.array(labels)


def real_like(
    embeddings: np.ndarray, labels: np.ndarray, size: int, queries: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery, probes, mates): `size` synthetic identities and probes of `queries` of them."""
    rng = np.random.default_rng(seed)
    people = np.unique(labels)
    means = np.stack([embeddings[labels == p].mean(0) for p in people])
    residuals = embeddings - means[np.searchsorted(people, labels)]
    centre, cov = means.mean(0), np.cov(means, rowvar=False)
    factor = np.linalg.cholesky(cov + 1e-6 * np.eye(len(cov)))

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    gallery = np.empty((size, embeddings.shape[1]), np.float32)
    centroids_of_mates = []
    mates = rng.choice(size, queries, replace=False)
    for start in range(0, size, 100_000):
        n = min(100_000, size - start)
        centroids = centre + rng.standard_normal((n, len(centre))) @ factor.T
        gallery[start : start + n] = unit(
            centroids + residuals[rng.integers(len(residuals), size=n)]
        )
        inside = mates[(mates >= start) & (mates < start + n)]
        centroids_of_mates.append((inside, centroids[inside - start]))
    order = np.concatenate([m for m, _ in centroids_of_mates])
    centroids = np.concatenate([c for _, c in centroids_of_mates])
    probes = unit(centroids + residuals[rng.integers(len(residuals), size=len(order))])
    return gallery, probes, order


class _Faiss:
    """A bare FAISS index behind the `search(queries, k)` of facelab's indexes."""

    def __init__(self, index: object) -> None:
        self.index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)


def timed(
    index: ExactIndex | FaissIndex | _Faiss, probes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 rows, per-query seconds), one query at a time."""
    rows, seconds = np.empty(len(probes), np.int64), np.empty(len(probes))
    for i, probe in enumerate(probes):
        start = time.perf_counter()
        _, found = index.search(probe[None], 1)
        seconds[i] = time.perf_counter() - start
        rows[i] = found[0, 0]
    return rows, seconds


def report(
    name: str,
    build: float,
    rows: np.ndarray,
    seconds: np.ndarray,
    truth: np.ndarray,
    mates: np.ndarray,
) -> None:
    ms = np.percentile(seconds, [50, 99]) * 1000
    print(
        f"| {name} | {build:.0f} | {ms[0]:.2f} | {ms[1]:.2f} | {np.mean(rows == truth):.4f} "
        f"| {np.mean(rows == mates):.4f} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nlist", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument(
        "--sq8-nlist", type=int, nargs="*", default=[], help="also IVF with 8-bit codes"
    )
    parser.add_argument("--hnsw", action="store_true", help="also HNSW (slow to build)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--min-images", type=int, default=4)
    parser.add_argument("--per-person", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "lfw_dlib_embeddings.npz")
    args = parser.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    embeddings, labels = real_embeddings(args.cache, args.min_images, args.per_person)
    print(f"real embeddings: {len(embeddings)} of {len(np.unique(labels))} LFW people")
    start = time.perf_counter()
    gallery, probes, mates = real_like(embeddings, labels, args.size, args.queries)
    print(f"{args.size} real-like identities made in {time.perf_counter() - start:.0f} s")
    exact = ExactIndex(gallery)
    truth = exact.search(probes, 1)[1][:, 0]
    print("\n| index | build s | p50 ms | p99 ms | recall@1 vs exact | top-1 = mate |")
    print("| --- | --- | --- | --- | --- | --- |")
    # The machine's own noise: the same loop over a 1000-vector exact search (~0.02 ms of work).
    _, seconds = timed(ExactIndex(gallery[:1000]), probes)
    floor = np.percentile(seconds, [50, 99]) * 1000
    print(f"| noise floor: exact over 1000 vectors | 0 | {floor[0]:.2f} | {floor[1]:.2f} | - | - |")
    rows, seconds = timed(exact, probes[:50])
    report("exact (50 queries)", 0, rows, seconds, truth[:50], mates[:50])
    for nlist in args.nlist:
        start = time.perf_counter()
        ivf = FaissIndex(gallery, "ivf", nlist=nlist)
        build = time.perf_counter() - start
        for nprobe in args.nprobe:
            ivf.index.nprobe = min(nprobe, nlist)
            rows, seconds = timed(ivf, probes)
            report(f"ivf nlist={nlist} nprobe={nprobe}", build, rows, seconds, truth, mates)
        del ivf
    for nlist in args.sq8_nlist:  # not a facelab method (yet): FAISS directly
        import faiss

        start = time.perf_counter()
        sq8 = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(gallery.shape[1]),
            gallery.shape[1],
            nlist,
            faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT,
        )
        sample = np.random.default_rng(0).choice(len(gallery), 64 * nlist, replace=False)
        sq8.train(gallery[sample])
        sq8.add(gallery)
        build = time.perf_counter() - start
        for nprobe in args.nprobe:
            sq8.nprobe = nprobe
            rows, seconds = timed(_Faiss(sq8), probes)
            report(f"ivf-sq8 nlist={nlist} nprobe={nprobe}", build, rows, seconds, truth, mates)
    if args.hnsw:
        start = time.perf_counter()
        hnsw = FaissIndex(gallery, "hnsw", hnsw_m=32, ef_construction=40)
        build = time.perf_counter() - start
        for ef in args.ef_search:
            hnsw.ef_search = ef
            rows, seconds = timed(hnsw, probes)
            report(f"hnsw M=32 efSearch={ef}", build, rows, seconds, truth, mates)


if __name__ == "__main__":
    main()
