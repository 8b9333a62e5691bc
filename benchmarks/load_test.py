"""Load test of `facelab serve` on loopback: requests/s and latency percentiles at 1, 8 and 32
concurrent clients, with dynamic batching (one mode per batching wait) and without (one model
call at a time).

For each mode the script starts its own server (`python -m facelab serve` on 127.0.0.1, a
free port, a throw-away key and gallery), warms it up, then runs asyncio httpx clients that
POST LFW photos to /v1/embed; every level is bounded by a request count and a time limit and
the server is stopped at the end. Prints one table (and writes it as JSON).

    python benchmarks/load_test.py [--model dlib_resnet] [--clients 1 8 32] [--requests 96]
        [--max-seconds 90] [--max-batch 8] [--max-wait-ms 0 5] [--threads N]
        [--out runs/load_test.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from facelab.fileio import atomic_write_text

SHARED = Path(__file__).resolve().parents[2] / "shared"
log = logging.getLogger("load_test")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    model: str,
    max_batch: int,
    threads: int | None,
    tmp: Path,
    role: str = "ro",
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str, str]:
    """(process, base URL, key) of a server on a free loopback port; `extra`: more options."""
    key = secrets.token_urlsafe(24)
    port = free_port()
    env = {**os.environ, "FACELAB_API_KEYS": f"{role}:{key}"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [
        sys.executable, "-m", "facelab", "serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--gallery", str(tmp / f"gallery-{max_batch}.db"),
        "--max-batch", str(max_batch), *extra,
    ]  # fmt: skip
    log_file = tmp / f"server-{max_batch}.log"
    with open(log_file, "wb") as logs:  # the server keeps its own handle
        process = subprocess.Popen(command, env=env, stdout=logs, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log_file.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url, key
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError("server did not start within 180 s")


async def run_level(
    url: str, key: str, photos: list[bytes], clients: int, requests: int, max_seconds: float
) -> dict[str, float]:
    """`clients` concurrent clients send at most `requests` requests in at most `max_seconds`."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.monotonic() + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued, errors
        while issued < requests and time.monotonic() < deadline:
            photo = photos[issued % len(photos)]
            issued += 1
            tick = time.perf_counter()
            r = await http.post("/v1/embed", files={"image": ("face.jpg", photo, "image/jpeg")})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - tick)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"X-API-Key": key}, timeout=120, limits=limits
    ) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = 1000 * np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 2),
        "requests_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def batch_stats(url: str, key: str) -> dict:
    return httpx.get(f"{url}/v1/info", headers={"X-API-Key": key}, timeout=30).json()["batching"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dlib_resnet")
    parser.add_argument("--images", default=str(SHARED / "data/lfw/images/George_W_Bush"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="per level, at most")
    parser.add_argument("--max-seconds", type=float, default=90, help="per level, at most")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching mode's batch")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        nargs="+",
        default=[0.0, 5.0],
        help="one batching mode per value: how long a batch waits to fill",
    )
    parser.add_argument("--threads", type=int, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--out", default="runs/load_test.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request

    photos = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))[:64]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="facelab-load-") as tmp:
        modes = [(f"batching, wait {w:g} ms", args.max_batch, w) for w in args.max_wait_ms]
        for mode, max_batch, wait in [*modes, ("one at a time", 1, 0.0)]:
            folder = Path(tmp) / f"{max_batch}-{wait:g}"
            folder.mkdir()
            wait_flag = ("--max-wait-ms", str(wait))
            process, url, key = start_server(
                args.model, max_batch, args.threads, folder, extra=wait_flag
            )
            try:
                asyncio.run(run_level(url, key, photos, 2, 4, 120))  # warm-up
                for clients in args.clients:
                    before = batch_stats(url, key)
                    bound = max(args.requests, clients)
                    row = asyncio.run(run_level(url, key, photos, clients, bound, args.max_seconds))
                    after = batch_stats(url, key)
                    for stage in ("detect", "embed"):
                        if stage in after:
                            items = after[stage]["items"] - before[stage]["items"]
                            batches = after[stage]["batches"] - before[stage]["batches"]
                            row[f"{stage}_batch"] = items / max(1, batches)
                    rows.append({"mode": mode, "max_batch": max_batch, "max_wait_ms": wait, **row})
                    log.info("%s", rows[-1])
            finally:
                process.terminate()
                process.wait(timeout=60)
    atomic_write_text(args.out, json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    print(f"\nfacelab serve, {args.model}, POST /v1/embed of LFW photos (one face each), loopback")
    print(
        "| mode | clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms | "
        "mean detect batch | mean embed batch |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['errors']} | "
            f"{r['requests_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r.get('detect_batch', 0):.2f} | {r['embed_batch']:.2f} |"
        )


if __name__ == "__main__":
    main()
