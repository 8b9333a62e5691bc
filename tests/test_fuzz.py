"""Fuzzing: schemathesis against the server's own OpenAPI document (in-process, bounded), and
hypothesis on the image decoding path with random and mutated bytes: no 500s, no hangs."""

from __future__ import annotations

import base64
import io
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from serving import KEYS, READ, RO, WRITE, tiny_model, upload

from facelab.data.images import ImageError, decode_image
from facelab.serve import ApiKeys, ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("single_torch_thread")
log = logging.getLogger(__name__)

MAX_PIXELS = 250_000  # small, so that no mutated header makes a test decode a big image
# The same examples on every run (a failure reproduces), and no per-example deadline: on a loaded
# 2-core machine a 2-5 s deadline fails for the machine's sake, not the code's.
FUZZ = settings(deadline=None, derandomize=True, database=None)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    gallery = tmp_path_factory.mktemp("fuzz") / "gallery.db"
    application = create_app(tiny_model(), ServeConfig(gallery=gallery, keys=KEYS))
    with TestClient(application):  # runs the lifespan: the batching queues stop afterwards
        yield application


@pytest.fixture(scope="module")
def local_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The same server in --insecure-local mode (no keys; loopback host names only)."""
    gallery = tmp_path_factory.mktemp("fuzz-local") / "gallery.db"
    application = create_app(tiny_model(), ServeConfig(gallery=gallery, insecure_local=True))
    with TestClient(application):
        yield application


LOOPBACK = {"Host": "127.0.0.1:8000"}  # a host name an --insecure-local server answers to


def _fuzzed(application: object) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_asgi("/openapi.json", application, headers=LOOPBACK)
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=6,
        deterministic=True,
        database="none",
    )
    return schema


@pytest.fixture(scope="module")
def api_schema(app: object) -> schemathesis.BaseSchema:
    return _fuzzed(app)


@pytest.fixture(scope="module")
def local_schema(local_app: object) -> schemathesis.BaseSchema:
    return _fuzzed(local_app)


schema = schemathesis.pytest.from_fixture("api_schema")
local = schemathesis.pytest.from_fixture("local_schema")


STATUSES: Counter[tuple[str, int]] = Counter()  # (operation, status) of every fuzzed request


@pytest.fixture(scope="module", autouse=True)
def _fuzz_summary() -> Iterator[None]:
    yield
    if STATUSES:
        by_status = Counter(status for (_, status), n in STATUSES.items() for _ in range(n))
        log.info(
            "schemathesis: %d requests over %d operations, statuses %s",
            sum(STATUSES.values()),
            len({op for op, _ in STATUSES}),
            dict(sorted(by_status.items())),
        )


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_contract(case: schemathesis.Case) -> None:
    response = case.call_and_validate(headers=WRITE, checks=CHECKS)
    STATUSES[(case.operation.label, response.status_code)] += 1


@local.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_contract_insecure_local(case: schemathesis.Case) -> None:
    """Without keys, as a browser on the same machine would call it (same-origin headers)."""
    same_origin = {**LOOPBACK, "Origin": "http://127.0.0.1:8000"}
    response = case.call_and_validate(headers=same_origin, checks=CHECKS)
    STATUSES[(case.operation.label, response.status_code)] += 1


def _seed_images() -> dict[str, bytes]:
    """One small image in each format Pillow writes without extra libraries."""
    y, x = np.mgrid[0:24, 0:20]
    pixels = np.stack([x * 12, y * 10, (x + y) * 5], axis=-1).astype(np.uint8)
    seeds = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM", "TGA", "PCX"):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        seeds[fmt] = buf.getvalue()
    return seeds


SEEDS = _seed_images()


def _decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, "fuzz", max_pixels=MAX_PIXELS)
    except ImageError:
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on malformed TIFF tags
@given(st.binary(max_size=4096))
@settings(FUZZ, max_examples=300)
def test_decoding_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    keep=st.floats(0.05, 1.0),
)
@settings(FUZZ, max_examples=250)
def test_decoding_mutated_images(fmt: str, edits: list[tuple[int, int]], keep: float) -> None:
    data = bytearray(SEEDS[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    _decodes_or_refuses(bytes(data[: max(1, int(len(data) * keep))]))


@given(data=st.binary(max_size=2048), as_json=st.booleans())
@settings(FUZZ, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_server_refuses_random_bytes(app: object, data: bytes, as_json: bool) -> None:
    client = TestClient(app)
    if as_json:
        r = client.post("/v1/embed", json={"image": base64.b64encode(data).decode()}, headers=READ)
    else:
        r = client.post("/v1/embed", files=[upload("image", data)], headers=READ)
    assert r.status_code in (200, 413, 415, 422), r.text
    assert set(r.json()) >= ({"faces"} if r.status_code == 200 else {"error", "detail"})


def test_pillow_own_bomb_limit_is_a_refusal(tmp_path: Path) -> None:
    """Over Pillow's own limit (2 x 89 Mpx), Image.open raises before facelab's check."""
    from serving import png_header

    with pytest.raises(ImageError, match="exceeds|decompression bomb"):
        decode_image(png_header(20_000, 20_000), max_pixels=10**12)


HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@given(host=HEADER_TEXT, origin=st.none() | HEADER_TEXT, site=st.none() | HEADER_TEXT)
@settings(
    max_examples=80, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_host_and_origin_get_a_json_answer(
    local_app: object, host: str, origin: str | None, site: str | None
) -> None:
    """--insecure-local: whatever Host, Origin and Sec-Fetch-Site a page sends, the answer is
    a refusal (403/421) or the normal one, never a 500; foreign names are always refused."""
    headers = {"Host": host}
    headers |= {"Origin": origin} if origin is not None else {}
    headers |= {"Sec-Fetch-Site": site} if site is not None else {}
    r = TestClient(local_app).delete("/v1/identities/nobody", headers=headers)
    assert r.status_code in (403, 404, 421), r.text
    loopback = host.strip().lower().rsplit(":", 1)[0] in ("localhost", "127.0.0.1")
    if not loopback and not host.strip().lower().startswith("[::1]"):
        assert r.status_code == 421


KEY_TEXT = st.text(
    st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=","), min_size=16
)


@given(key=KEY_TEXT, comment=st.booleans())
@settings(max_examples=200, deadline=None)
def test_any_key_without_blanks_is_read_whole(key: str, comment: bool) -> None:
    """A key is every character after `ROLE:` up to a blank (`#`, `:` included), in the key
    file and in the environment variable alike."""
    entry = f"rw:{key}" + ("  # a comment" if comment else "")
    assert ApiKeys.parse([entry], "fuzz").roles == ((key, "rw"),)
    assert ApiKeys.parse(f"ro:{RO},{entry}".split(","), "fuzz").role(key) == "rw"
