"""Latency of one `/v1/identify` request: a 640x480 photo with one face, MTCNN beside BlazeFace.

Starts one `facelab serve --model dlib_resnet` per detector (and per embedding runtime of
`--runtimes`: PyTorch's frozen graph, onnxruntime) on loopback (its own gallery, one
person enrolled from three LFW photos), then sends the probe photo (a real LFW face pasted into
a 640x480 grey frame, JPEG) to the servers in turn, one request at a time, so both see the same
moments of the machine. Prints p50/p95/p99 per detector and checks every answer names the
enrolled person. Bounded: `--requests` per server, then both servers are stopped.

    python benchmarks/identify_latency.py [--requests 100] [--threads 2] [--runtimes torch onnx]
        [--max-wait-ms 5 0]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from load_test import SHARED, start_server
from PIL import Image

from facelab.api import RUNTIMES
from facelab.fileio import atomic_write_text

log = logging.getLogger("identify_latency")
PERSON = "George_W_Bush"
DETECTORS = ("mtcnn", "blazeface")


def lfw_photo(number: int) -> Path:
    return SHARED / "data/lfw/images" / PERSON / f"{PERSON}_{number:04d}.jpg"


def probe_photo() -> bytes:
    """A real face in a 640x480 frame (off centre), as a phone or webcam would send it."""
    frame = Image.new("RGB", (640, 480), (118, 118, 118))
    frame.paste(Image.open(lfw_photo(10)).convert("RGB"), (300, 150))
    out = io.BytesIO()
    frame.save(out, "JPEG", quality=92)
    return out.getvalue()


def config_label(config: tuple[str, str, float | None], show_runtime: bool) -> str:
    """A server's row name: its detector, and its runtime and batching wait where they vary."""
    detector, runtime, wait = config
    details = ([runtime] if show_runtime else []) + (
        [f"wait {wait:g} ms"] if wait is not None else []
    )
    return f"{detector} ({', '.join(details)})" if details else detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="per server")
    parser.add_argument("--threads", type=int, default=2, help="each server's OMP_NUM_THREADS")
    parser.add_argument("--out", default="runs/identify_latency.json")
    parser.add_argument(
        "--runtimes",
        nargs="+",
        choices=RUNTIMES,
        default=["torch"],
        help="each server's embedding runtime (`facelab serve --runtime`)",
    )
    parser.add_argument(
        "--max-wait-ms",
        nargs="+",
        type=float,
        help="each server's batching wait (`facelab serve --max-wait-ms`; default: serve's)",
    )
    args = parser.parse_args()
    waits = args.max_wait_ms or [None]
    configs = [(d, r, w) for d in DETECTORS for r in args.runtimes for w in waits]
    names = {
        c: config_label(c, len(args.runtimes) > 1 or args.runtimes != ["torch"]) for c in configs
    }
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    probe = probe_photo()
    servers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for detector, runtime, wait in configs:
                folder = Path(tmp) / f"{detector}_{runtime}_{wait}"
                folder.mkdir()
                flags = ("--detector", detector, "--runtime", runtime)
                if wait is not None:
                    flags += ("--max-wait-ms", str(wait))
                process, url, key = start_server(
                    "dlib_resnet", 8, args.threads, folder, "rw", flags
                )
                label = names[(detector, runtime, wait)]
                servers[label] = (process, httpx.Client(base_url=url, timeout=120,
                                                        headers={"X-API-Key": key}))  # fmt: skip
                files = [("images", (f"{n}.jpg", lfw_photo(n).read_bytes())) for n in (1, 2, 3)]
                reply = servers[label][1].post("/v1/enroll", data={"name": PERSON}, files=files)
                reply.raise_for_status()
            latencies: dict[str, list[float]] = {d: [] for d in servers}
            for n in range(args.requests + 5):  # the first 5 rounds warm up
                for detector in servers:
                    client = servers[detector][1]
                    tick = time.perf_counter()
                    reply = client.post("/v1/identify", files={"image": ("probe.jpg", probe)})
                    seconds = time.perf_counter() - tick
                    if reply.status_code != 200:
                        raise RuntimeError(f"{detector}: {reply.status_code} {reply.text[:300]}")
                    (face,) = reply.json()["faces"]
                    if face["identity"] != PERSON:
                        raise RuntimeError(f"{detector}: the probe was answered {face['identity']}")
                    if n >= 5:
                        latencies[detector].append(1000 * seconds)
        finally:
            for process, client in servers.values():
                client.close()
                process.terminate()
                process.wait(timeout=30)
    rows = []
    for detector in latencies:
        ms = np.asarray(latencies[detector])
        rows.append(
            {
                "detector": detector,
                "requests": len(ms),
                **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)},
            }
        )
    print("| detector | requests | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['detector']} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} |"
        )
    atomic_write_text(args.out, json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
