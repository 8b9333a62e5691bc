"""Two `facelab serve` replicas over one PostgreSQL gallery, on loopback, real processes:

- sync: an enrollment on replica A, then B is asked (identify, the same image) until it names
  the new identity; the time from A's reply to B's first right answer, over `--enrollments`.
- load: clients mixing identify (90 %) and enroll (10 %) for `--seconds`, spread over two
  replicas on PostgreSQL, against the same clients on one replica over an SQLite file;
  throughput and p50/p99 per kind.
- startup: a replica started over a gallery of N identities (synthetic embeddings): seconds
  until it answers, and its memory (RSS, peak), against the same replica over an empty gallery;
  then, per N, the same replica with `--snapshot`: its first start (no saved index: a full
  read, then saved), and a restart after 100 more identities were enrolled (the saved index
  plus the changes since), with the rows it read from the database; beside that restart, the
  same saved file and changes loaded by a `GalleryReplica` in this process (no server, no
  model), before and after it, so in-server and in-process loads are compared on one machine
  state. Each row gives the machine's 1-minute load average when it ended.

The PostgreSQL cluster is a throwaway one (tests/postgres.py); the model is the tests' tiny
random MobileFaceNet (128-d here), so the figures are about the gallery, replicas and HTTP,
not about a network's speed.

    python benchmarks/pg_replicas.py sync load
    python benchmarks/pg_replicas.py startup --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import psycopg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway cluster and replica processes

from postgres import Cluster, Replica  # noqa: E402
from serving import png, upload  # noqa: E402

from facelab.gallery.backends import open_store  # noqa: E402
from facelab.gallery.replica import GalleryReplica  # noqa: E402
from facelab.gallery.store import EnrolledFace, ModelInfo  # noqa: E402
from facelab.models.checkpoint import save_checkpoint  # noqa: E402
from facelab.models.face_model import FaceModel  # noqa: E402

DIM = 128


def checkpoint(folder: Path) -> tuple[str, ModelInfo]:
    torch.manual_seed(0)
    model = FaceModel.create("mobilefacenet", embedding_dim=DIM, input_size=32).eval()
    return str(save_checkpoint(folder / "tiny.pt", model)), ModelInfo.of(model)


def synthetic(size: int, chunk: int = 50_000) -> Iterator[tuple[int, np.ndarray]]:
    """(first identity number, unit vectors) chunks of `size` random 128-d embeddings."""
    rng = np.random.default_rng(0)
    for first in range(0, size, chunk):
        vectors = rng.standard_normal((min(chunk, size - first), DIM), dtype=np.float32)
        yield first, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fill(gallery: str | Path, info: ModelInfo, size: int) -> float:
    """`size` identities of one synthetic embedding each, through the store; seconds taken."""
    start = time.perf_counter()
    with open_store(gallery, create=True) as store:
        for first, vectors in synthetic(size):
            faces = {
                f"synthetic_{first + i}": [EnrolledFace("-", "-", 0, v)]
                for i, v in enumerate(vectors)
            }
            store.add(faces, info)
    return time.perf_counter() - start


def bulk_fill(gallery: str, info: ModelInfo, size: int) -> float:
    """As `fill`, in one transaction written with COPY (the store's row-by-row inserts take
    about an hour for a million here); the same tables, triggers and revision bump."""
    start = time.perf_counter()
    open_store(gallery, create=True).close()
    now = time.time()
    with psycopg.connect(gallery) as conn, conn.cursor() as cur:
        revision = int(
            cur.execute("SELECT value FROM meta WHERE key = 'revision' FOR UPDATE").fetchone()[0]
        )
        cur.execute("SELECT set_config('facelab.revision', %s, true)", (str(revision + 1),))
        cur.execute(
            "INSERT INTO meta VALUES ('model', %s) ON CONFLICT DO NOTHING",
            (json.dumps(asdict(info)),),
        )
        with cur.copy("COPY identities (id, name, created) FROM STDIN") as copy:
            for i in range(size):
                copy.write_row((i + 1, f"synthetic_{i}", now))
        with cur.copy(
            "COPY images (identity_id, path, sha256, face, embedding, created) FROM STDIN"
        ) as copy:
            for first, vectors in synthetic(size):
                for i, v in enumerate(vectors):
                    copy.write_row((first + i + 1, "-", "-", 0, v.astype("<f4").tobytes(), now))
        cur.execute("SELECT setval('identities_id_seq', %s)", (size,))
        cur.execute("UPDATE meta SET value = %s WHERE key = 'revision'", (str(revision + 1),))
    with psycopg.connect(gallery, autocommit=True) as conn:
        conn.execute("ANALYZE")  # as autovacuum does after a bulk load: the planner's statistics
    return time.perf_counter() - start


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "- | -"
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000
    return f"{p50:.1f} | {p99:.1f}"


def identify(url: str, seed: int) -> tuple[str, int]:
    r = httpx.post(
        f"{url}/v1/identify",
        data={"threshold": "-1", "k": "1"},
        files=[upload("image", png(seed))],
        timeout=60,
    )
    return (r.json()["faces"][0]["identity"] if r.status_code == 200 else ""), r.status_code


def enroll(url: str, name: str, seed: int) -> httpx.Response:
    files = [upload("images", png(seed))]
    return httpx.post(f"{url}/v1/enroll", data={"name": name}, files=files, timeout=60)


def sync(cluster: Cluster, model: str, info: ModelInfo, folder: Path, enrollments: int) -> None:
    gallery = cluster.new_database()
    fill(gallery, info, 1000)
    a = Replica(gallery, model, log=folder / "sync_a.log")
    b = Replica(gallery, model, log=folder / "sync_b.log")
    applied, answered, plain = [], [], []
    try:
        for i in range(enrollments):
            reply = enroll(a.url, f"sync_{i}", 10_000 + i)
            done, replied_at = time.perf_counter(), time.time()
            assert reply.status_code == 200, reply.text
            revision = int(reply.headers["X-Gallery-Revision"])
            while identify(b.url, 10_000 + i)[0] != f"sync_{i}":
                if time.perf_counter() - done > 30:
                    raise RuntimeError(f"replica B never answered sync_{i}")
            answered.append(time.perf_counter() - done)
            status = httpx.get(f"{b.url}/v1/info").json()["gallery"]
            assert status["revision"] == revision  # nobody else writes: its last change is ours
            applied.append(status["updated_at"] - replied_at)  # one machine, one clock
            start = time.perf_counter()  # the same request once more: identify's own time
            identify(b.url, 10_000 + i)
            plain.append(time.perf_counter() - start)
    finally:
        a.stop()
        b.stop()
    print(f"\n## sync: enrollment on A answered by B ({enrollments} enrollments, 1000 enrolled)\n")
    print("| measure (from A's reply to the enrollment) | p50 ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- |")
    for name, values in (
        ("B's index took the change in (B's clock; < 0: before A replied)", applied),
        ("B's identify names the new person (end of the first request after)", answered),
        ("one identify request to B, for comparison (no change pending)", plain),
    ):
        ms = np.array(values) * 1000
        print(f"| {name} | {percentiles(values)} | {ms.max():.1f} |")


def run_load(urls: list[str], clients: int, seconds: float, tag: str) -> dict[str, list]:
    """Clients spread over `urls`; each request identify (90 %) or enroll of a new name."""
    out: dict[str, list] = {"identify": [], "enroll": [], "errors": []}
    stop = time.perf_counter() + seconds

    def client(c: int) -> None:
        rng = np.random.default_rng(c)
        url = urls[c % len(urls)]
        i = 0
        while time.perf_counter() < stop:
            start = time.perf_counter()
            if rng.random() < 0.1:
                code = enroll(url, f"{tag}_{c}_{i}", 100_000 * (c + 1) + i).status_code
                kind = "enroll"
            else:
                code = identify(url, int(rng.integers(1000)))[1]
                kind = "identify"
            (out[kind] if code == 200 else out["errors"]).append(time.perf_counter() - start)
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def load(
    cluster: Cluster, model: str, info: ModelInfo, folder: Path, args: argparse.Namespace
) -> None:
    rows = []
    gallery = cluster.new_database()
    fill(gallery, info, 1000)
    replicas = [Replica(gallery, model, log=folder / f"load_{n}.log") for n in "ab"]
    try:
        rows.append(
            (
                "2 replicas + PostgreSQL",
                run_load([r.url for r in replicas], args.clients, args.seconds, "pg"),
            )
        )
    finally:
        for r in replicas:
            r.stop()
    sqlite = folder / "load.db"
    fill(sqlite, info, 1000)
    replica = Replica(str(sqlite), model, log=folder / "load_sqlite.log")
    try:
        rows.append(
            ("1 replica + SQLite", run_load([replica.url], args.clients, args.seconds, "sq"))
        )
    finally:
        replica.stop()
    print(f"\n## load: {args.clients} clients, {args.seconds:.0f} s, 90 % identify / 10 % enroll\n")
    print("| setup | requests/s | identify p50 ms | p99 ms | enroll p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, out in rows:
        done = len(out["identify"]) + len(out["enroll"])
        print(
            f"| {name} | {done / args.seconds:.1f} | {percentiles(out['identify'])} "
            f"| {percentiles(out['enroll'])} | {len(out['errors'])} |",
            flush=True,
        )


def memory_kib(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def started(gallery: str, model: str, log: Path, *options: str) -> list[str]:
    """Start a replica, measure it, stop it: start s, gallery load s, RSS and peak MiB, rows
    it read."""
    replica = Replica(gallery, model, *options, log=log)
    rss, peak = memory_kib(replica.proc.pid)
    status = httpx.get(f"{replica.url}/v1/info", timeout=60).json()["gallery"]
    replica.stop()
    read = f"{status['rows_read']:,}" + (" (full)" if status["full_loads"] else "")
    return [
        f"{replica.startup_seconds:.1f}",
        f"{status['loaded_in_s']:.2f}",
        f"{rss / 1024:.0f}",
        f"{peak / 1024:.0f}",
        read,
    ]


def startup(
    cluster: Cluster, model: str, info: ModelInfo, folder: Path, sizes: list[int], search: str
) -> None:
    print(f"\n## startup: one replica (--search {search}) over N identities, 128-d\n")
    print(
        "| identities | fill s | start | start s (until /healthz) | of which gallery load s "
        "| RSS MiB | peak RSS MiB | rows read | load avg |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in [0, *sizes]:
        gallery = cluster.new_database()
        filled = f"{bulk_fill(gallery, info, size) if size else 0.0:.0f}"
        runs = [("without --snapshot", ())]
        if size:
            saved = ("--snapshot", str(folder / f"saved_{size}"))
            runs += [("--snapshot, none saved yet", saved), ("--snapshot, 100 changes", saved)]
        for n, (how, snapshot) in enumerate(runs):
            if n == 2:  # 100 identities enrolled while the replica was down
                fill_more(gallery, info, size, 100)
                saved_file = next((folder / f"saved_{size}").glob("*.npz"))
                kept = shutil.copy(saved_file, folder / "kept.npz")  # each restart reads this
                in_process = [loaded_in_process(gallery, search, saved_file, kept)]
            log = folder / f"start_{size}_{n}.log"
            row = [*started(gallery, model, log, "--search", search, *snapshot), load_average()]
            print(f"| {size:,} | {filled} | {how} | {' | '.join(row)} |", flush=True)
            if n == 2:
                in_process.append(loaded_in_process(gallery, search, saved_file, kept))
                loads = " / ".join(in_process)
                print(
                    f"| {size:,} | | same file and changes, GalleryReplica in this process "
                    f"(before / after the server) | | {loads} | | | | {load_average()} |",
                    flush=True,
                )
        if size:
            files = list((folder / f"saved_{size}").glob("*.npz"))
            print(f"| {size:,} | | saved index file: {files[0].stat().st_size / 2**20:.0f} MiB |")
        cluster.sql(f"DROP DATABASE {gallery.rsplit('/', 1)[1]}")


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def loaded_in_process(gallery: str, search: str, saved_file: Path, kept: Path) -> str:
    """The replica's first load (`loaded_in_s`) from `kept` put back in place of `saved_file`,
    in this process; the file is put back again after (closing saves the caught-up index)."""
    shutil.copy(kept, saved_file)
    replica = GalleryReplica(gallery, search, snapshot_dir=saved_file.parent)
    seconds = replica.status().loaded_in_s
    replica.close()
    shutil.copy(kept, saved_file)
    return f"{seconds:.2f}"


def fill_more(gallery: str, info: ModelInfo, first: int, count: int) -> None:
    """`count` more synthetic identities, one enrollment (revision) each."""
    rng = np.random.default_rng(first)
    with open_store(gallery) as store:
        for i in range(count):
            v = rng.standard_normal(DIM).astype(np.float32)
            store.add({f"later_{i}": [EnrolledFace("-", "-", 0, v / np.linalg.norm(v))]}, info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+", choices=("sync", "load", "startup"))
    parser.add_argument("--enrollments", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--search", default="exact")
    args = parser.parse_args()
    cluster = Cluster()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            model, info = checkpoint(folder)
            if "sync" in args.parts:
                sync(cluster, model, info, folder, args.enrollments)
            if "load" in args.parts:
                load(cluster, model, info, folder, args)
            if "startup" in args.parts:
                startup(cluster, model, info, folder, args.sizes, args.search)
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
