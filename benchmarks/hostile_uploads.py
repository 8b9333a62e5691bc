"""Cost of hostile uploads to `facelab serve`: peak memory and time of enroll requests made
of blank 4898x4898 PNGs (3 KB each, under the 24 Mpx per-image limit), one request and then
three in parallel, each scenario on its own fresh server (a real `python -m facelab serve`
subprocess on loopback), its peak RSS read from /proc (VmHWM) and sampled while it works.

    python benchmarks/hostile_uploads.py [--model dlib_resnet] [--images 10] [--parallel 3]
        [--side 4898] [--out runs/hostile_uploads.json] [-- extra serve options]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import httpx
from load_test import start_server
from PIL import Image

from facelab.fileio import atomic_write_text

log = logging.getLogger("hostile_uploads")


def blank_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side), 1).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


async def enroll_requests(url: str, key: str, png: bytes, images: int, parallel: int) -> list:
    async def one(http: httpx.AsyncClient, n: int) -> tuple[int, float, str]:
        files = [("images", (f"blank{i}.png", png, "image/png")) for i in range(images)]
        tick = time.perf_counter()
        r = await http.post("/v1/enroll", data={"name": f"blank_{n}"}, files=files)
        return r.status_code, time.perf_counter() - tick, r.json().get("error", "")

    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=600) as http:
        return await asyncio.gather(*(one(http, n) for n in range(parallel)))


def scenario(args: argparse.Namespace, png: bytes, parallel: int, tmp: Path) -> dict:
    folder = tmp / f"parallel-{parallel}"
    folder.mkdir()
    process, url, key = start_server(
        args.model, 8, None, folder, role="rw", extra=tuple(args.serve)
    )
    try:
        idle = rss_kib(process.pid, "VmHWM")
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                samples.append(rss_kib(process.pid, "VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tick = time.perf_counter()
        replies = asyncio.run(enroll_requests(url, key, png, args.images, parallel))
        wall = time.perf_counter() - tick
        done.set()
        sampler.join()
        peak = rss_kib(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {
        "parallel": parallel,
        "images_per_request": args.images,
        "statuses": sorted(f"{status} {error}".strip() for status, _, error in replies),
        "request_seconds": [round(s, 2) for _, s, _ in replies],
        "wall_seconds": round(wall, 2),
        "idle_rss_mib": round(idle / 1024),
        "peak_rss_mib": round(peak / 1024),
        "growth_mib": round((peak - idle) / 1024),
        "max_sampled_rss_mib": round(max(samples, default=0) / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dlib_resnet")
    parser.add_argument("--images", type=int, default=10, help="blank PNGs per request")
    parser.add_argument("--parallel", type=int, default=3, help="requests of the second run")
    parser.add_argument("--side", type=int, default=4898)
    parser.add_argument("--out", default="runs/hostile_uploads.json")
    parser.add_argument("serve", nargs="*", help="extra `facelab serve` options (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    png = blank_png(args.side)
    log.info("blank %dx%d PNG: %d bytes", args.side, args.side, len(png))
    rows = []
    with tempfile.TemporaryDirectory(prefix="facelab-hostile-") as tmp:
        for parallel in (1, args.parallel):
            rows.append(scenario(args, png, parallel, Path(tmp)))
            log.info("%s", rows[-1])
    atomic_write_text(args.out, json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    print(f"\nPOST /v1/enroll, {args.images} blank {args.side}x{args.side} PNGs "
          f"({len(png)} bytes each), {args.model}")  # fmt: skip
    print("| parallel | statuses | wall s | idle RSS MiB | peak RSS MiB | growth MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['parallel']} | {', '.join(r['statuses'])} | {r['wall_seconds']} | "
            f"{r['idle_rss_mib']} | {r['peak_rss_mib']} | {r['growth_mib']} |"
        )


if __name__ == "__main__":
    main()
