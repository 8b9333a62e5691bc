"""Helpers shared by the server tests: keys, a tiny model, generated images, a live server."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from facelab.models.face_model import FaceModel
from facelab.serve import ApiKeys

RW, RO = "rw-key-0123456789abcdef", "ro-key-0123456789abcdef"
KEYS = ApiKeys.parse([f"rw:{RW}", f"ro:{RO}"], "test")
WRITE, READ = {"X-API-Key": RW}, {"Authorization": f"Bearer {RO}"}


def tiny_model(seed: int = 0) -> FaceModel:
    """A randomly initialised 32-d MobileFaceNet on 32x32 centre crops: fast, no detector."""
    torch.manual_seed(seed)
    return FaceModel.create("mobilefacenet", embedding_dim=32, input_size=32).eval()


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def upload(field: str, data: bytes, kind: str = "image/png") -> tuple[str, tuple[str, bytes, str]]:
    """One multipart file part, as httpx takes it."""
    return field, (f"{field}.png", data, kind)


@contextmanager
def live_server(app: Any, **options: Any) -> Iterator[str]:
    """Run `app` with uvicorn (`options`: more `uvicorn.Config` settings) on a free loopback
    port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
