"""1:N search at a million identities on real-like embeddings: query latency p50/p99 and recall@1
against exact search, through facelab's `GallerySearch` with the ``ivfpq`` index a replica
builds (``--search auto`` above 100k rows), plus optional sweeps of bare IVF, IVF-SQ8 and HNSW.

Real-like embeddings: dlib's ResNet (128-d) embeds LFW people with at least `--min-images`
photos (`--embeddings`: taken from a `facelab embed` .npz of all of LFW; else embedded once
and cached in runs/). Their per-person means give the between-identity distribution (mean
and full covariance) and their residuals from those means the within-identity variation of
real photo pairs. A synthetic identity is a centroid drawn from that Gaussian; its enrolled
embedding and its probe are the centroid plus two different real residuals (renormalised). So
the gallery has the anisotropic spectrum of real embeddings and each probe differs from its
mate as a second real photo does, which uniform random vectors (bench_gallery.py) do not.

    OMP_NUM_THREADS=1 python benchmarks/search_1m.py --embeddings lfw_all.npz  # default ivfpq
    python benchmarks/search_1m.py --ivfpq-nprobe 96 125 --rerank 128 512 --pq-m 64 128
    python benchmarks/search_1m.py --ivfpq-nlist --nlist 1024 --nprobe 64 128 --hnsw

Latency is per single query (batch of 1), one thread (`--threads`), on a shared machine; the
noise-floor rows time the same loop over fixed exact work. The ivfpq index is cached in
`--index-cache` (named by the gallery and the code that builds it), with the build's seconds
and memory beside it, so a re-run measures queries only. OMP_NUM_THREADS=1 keeps numpy's BLAS
from leaving a second thread spinning beside the measured one.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

from facelab.gallery import search as search_module
from facelab.gallery.search import ExactIndex, FaissIndex, GallerySearch, VectorIndex
from facelab.gallery.store import Snapshot

ROOT = Path(__file__).resolve().parents[1]
LFW = ROOT.parent / "shared" / "data" / "lfw" / "images"


def lfw_people(paths: list[Path], min_images: int, per_person: int) -> tuple[list[int], list[int]]:
    """(positions, person labels) of the first `per_person` photos (by file name) of each LFW
    person with at least `min_images`: the photos whose embeddings are used."""
    by_person: dict[str, list[int]] = {}
    for position in sorted(range(len(paths)), key=lambda i: paths[i].name):
        by_person.setdefault(paths[position].parent.name, []).append(position)
    positions, labels = [], []
    for person in sorted(p for p, photos in by_person.items() if len(photos) >= min_images):
        positions += by_person[person][:per_person]
        labels += [len(set(labels))] * len(by_person[person][:per_person])
    return positions, labels


def real_embeddings(
    cache: Path, min_images: int, per_person: int, embedded: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, person labels) of dlib's ResNet on LFW: taken from `embedded` (the .npz of
    `facelab embed LFW --model dlib_resnet`) when given, else computed once and cached."""
    if embedded is not None:
        with np.load(embedded) as data:
            if str(data["model"]) != "dlib_resnet":
                raise SystemExit(f"{embedded}: embeddings of {data['model']}, not dlib_resnet")
            paths = [Path(p) for p in data["paths"]]
            positions, labels = lfw_people(paths, min_images, per_person)
            return data["embeddings"][positions].astype(np.float32), np.array(labels)
    if cache.is_file():
        with np.load(cache) as data:
            return data["embeddings"], data["labels"]
    from facelab import api

    model = api.load_model("dlib_resnet")
    photos = [p for person in LFW.iterdir() if person.is_dir() for p in person.glob("*.jpg")]
    positions, labels = lfw_people(photos, min_images, per_person)
    start = time.perf_counter()
    embeddings = api.embed(model, [photos[i] for i in positions])
    print(f"embedded {len(positions)} LFW images in {time.perf_counter() - start:.0f} s")
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


def timed(index: VectorIndex, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 rows, per-query seconds), one query at a time."""
    rows, seconds = np.empty(len(probes), np.int64), np.empty(len(probes))
    for i, probe in enumerate(probes):
        start = time.perf_counter()
        _, found = index.search(probe[None], 1)
        seconds[i] = time.perf_counter() - start
        rows[i] = found[0, 0]
    return rows, seconds


def timed_identities(search: GallerySearch, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 identity numbers, per-query seconds) through `GallerySearch.query`, as a replica
    answers: one query at a time, k=1."""
    found, seconds = np.empty(len(probes), np.int64), np.empty(len(probes))
    for i, probe in enumerate(probes):
        start = time.perf_counter()
        (best,) = search.query(probe[None], 1)[0]
        seconds[i] = time.perf_counter() - start
        found[i] = int(best.identity[2:])
    return found, seconds


def report(
    name: str,
    build: str,
    rows: np.ndarray,
    seconds: np.ndarray,
    truth: np.ndarray,
    mates: np.ndarray,
) -> None:
    ms = np.percentile(seconds, [50, 99]) * 1000
    print(
        f"| {name} | {build} | {ms[0]:.2f} | {ms[1]:.2f} | {np.mean(rows == truth):.4f} "
        f"| {np.mean(rows == mates):.4f} | {os.getloadavg()[0]:.1f} |",
        flush=True,
    )


def rss_mib() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def replica_index(
    gallery: np.ndarray, options: dict[str, int], cache: Path
) -> tuple[GallerySearch, str]:
    """A replica's `GallerySearch` over the gallery (one identity per row) with an ``ivfpq``
    index, and its build figures. The FAISS index is cached in `cache` (a file this benchmark
    wrote) so that re-runs measure queries without rebuilding; the figures of the build that
    made it are kept beside it."""
    import faiss

    names = [f"id{i}" for i in range(len(gallery))]
    snapshot = Snapshot(0, names, np.arange(len(gallery)), gallery)
    figures = cache.with_suffix(".json")
    if cache.is_file() and figures.is_file():
        # The labels and names as a build makes them, then the cached index in its place.
        search = GallerySearch(None, "exact")  # type: ignore[arg-type]
        search.apply(snapshot)
        index = object.__new__(FaissIndex)  # the attributes FaissIndex() sets, around the file
        index.kind, index.ef_search, index.index = "ivfpq", 0, faiss.read_index(str(cache))
        index.rerank = inspect.signature(FaissIndex).parameters["rerank"].default
        search._index = index
        search.method = search.built = "ivfpq"
        built = json.loads(figures.read_text())
        return search, f"{built['seconds']:.0f} (cached), +{built['rss_mib']:.0f} MiB"
    before = rss_mib()
    start = time.perf_counter()
    search = GallerySearch(None, "ivfpq", **options)  # type: ignore[arg-type]
    search.apply(snapshot)
    seconds = time.perf_counter() - start
    grown = rss_mib() - before
    cache.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(search._index.index, str(cache))
    figures.write_text(json.dumps({"seconds": seconds, "rss_mib": grown}))
    return search, f"{seconds:.0f}, +{grown:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads per query")
    parser.add_argument(
        "--embeddings",
        type=Path,
        help="`facelab embed LFW --model dlib_resnet` output to take LFW embeddings from",
    )
    parser.add_argument(
        "--ivfpq-nlist", type=int, nargs="*", default=[0], help="0: the facelab default"
    )
    parser.add_argument("--pq-m", type=int, nargs="+", default=[0], help="0: the default")
    parser.add_argument("--ivfpq-nprobe", type=int, nargs="+", default=[0])
    parser.add_argument("--rerank", type=int, nargs="+", default=[0])
    parser.add_argument("--nlist", type=int, nargs="*", default=[], help="also plain IVF")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument(
        "--sq8-nlist", type=int, nargs="*", default=[], help="also IVF with 8-bit codes"
    )
    parser.add_argument("--hnsw", action="store_true", help="also HNSW (slow to build)")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--min-images", type=int, default=4)
    parser.add_argument("--per-person", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "lfw_dlib_embeddings.npz")
    parser.add_argument("--index-cache", type=Path, default=ROOT / "runs" / "search_1m")
    args = parser.parse_args()

    import faiss

    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    faiss.omp_set_num_threads(args.threads)
    embeddings, labels = real_embeddings(
        args.cache, args.min_images, args.per_person, args.embeddings
    )
    print(f"real embeddings: {len(embeddings)} of {len(np.unique(labels))} LFW people")
    start = time.perf_counter()
    gallery, probes, mates = real_like(embeddings, labels, args.size, args.queries)
    print(f"{args.size} real-like identities made in {time.perf_counter() - start:.0f} s")
    exact = ExactIndex(gallery)
    truth = exact.search(probes, 1)[1][:, 0]
    print(
        "\n| index | build s, memory | p50 ms | p99 ms | recall@1 vs exact | top-1 = mate | load |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    # The machine's own noise: the same loop over exact searches of fixed work, ~0.02 ms (1000
    # vectors) and ~1-2 ms (20,000): on an idle machine p99 stays near p50; on a busy one, the
    # longer a query, the likelier it is descheduled mid-way.
    for rows in (1000, 20_000):
        _, seconds = timed(ExactIndex(gallery[:rows]), probes)
        floor = np.percentile(seconds, [50, 99]) * 1000
        print(
            f"| noise floor: exact over {rows} vectors | 0 | {floor[0]:.2f} | {floor[1]:.2f} "
            f"| - | - | {os.getloadavg()[0]:.1f} |"
        )
    rows, seconds = timed(exact, probes[:50])
    report("exact (50 queries)", "0", rows, seconds, truth[:50], mates[:50])
    del exact
    # Cached indexes are named by the gallery they index and the code that builds them, so a
    # changed recipe or default rebuilds.
    builders = (FaissIndex.__init__, search_module._new_index, search_module._trained)
    builders += (search_module._cells, search_module._training_sample)
    recipe = "".join(inspect.getsource(f) for f in builders)
    sample = gallery[:: max(1, len(gallery) // 1000)].tobytes()
    for nlist, pq_m in itertools.product(args.ivfpq_nlist, args.pq_m):
        options = {k: v for k, v in {"nlist": nlist, "pq_m": pq_m}.items() if v}
        name = "_".join(f"{k}{v}" for k, v in options.items()) or "default"
        tag = hashlib.sha256(sample + recipe.encode()).hexdigest()[:12]
        cache = args.index_cache / f"ivfpq_{name}_{args.size}_{tag}.faiss"
        search, build = replica_index(gallery, options, cache)
        codes = faiss.downcast_index(faiss.extract_index_ivf(search._index.index))
        built_nprobe, built_rerank = codes.nprobe, search._index.rerank
        for nprobe, rerank in itertools.product(args.ivfpq_nprobe, args.rerank):
            codes.nprobe = nprobe or built_nprobe
            search._index.rerank = rerank or built_rerank
            rows, seconds = timed_identities(search, probes)
            label = (
                f"ivfpq nlist={codes.nlist} pq_m={codes.pq.M} nprobe={codes.nprobe} "
                f"rerank={search._index.rerank}"
            )
            report(label, build, rows, seconds, truth, mates)
        del search, codes
    for nlist in args.nlist:
        start = time.perf_counter()
        ivf = FaissIndex(gallery, "ivf", nlist=nlist)
        build = f"{time.perf_counter() - start:.0f}"
        for nprobe in args.nprobe:
            ivf.index.nprobe = min(nprobe, nlist)
            rows, seconds = timed(ivf, probes)
            report(f"ivf nlist={nlist} nprobe={nprobe}", build, rows, seconds, truth, mates)
        del ivf
    for nlist in args.sq8_nlist:  # not a facelab method: FAISS directly
        start = time.perf_counter()
        sq8 = faiss.IndexIVFScalarQuantizer(
            faiss.IndexFlatIP(gallery.shape[1]),
            gallery.shape[1],
            nlist,
            faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT,
        )
        sq8.train(search_module._training_sample(gallery, 64 * nlist, seed=0))
        sq8.add(gallery)
        build = f"{time.perf_counter() - start:.0f}"
        for nprobe in args.nprobe:
            sq8.nprobe = nprobe
            rows, seconds = timed(_Faiss(sq8), probes)
            report(f"ivf-sq8 nlist={nlist} nprobe={nprobe}", build, rows, seconds, truth, mates)
    if args.hnsw:
        start = time.perf_counter()
        hnsw = FaissIndex(gallery, "hnsw", hnsw_m=32, ef_construction=40)
        build = f"{time.perf_counter() - start:.0f}"
        for ef in args.ef_search:
            hnsw.ef_search = ef
            rows, seconds = timed(hnsw, probes)
            report(f"hnsw M=32 efSearch={ef}", build, rows, seconds, truth, mates)
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
