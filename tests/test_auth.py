"""Authentication on every route of `facelab serve`, enumerated from the app itself: a route added
later is covered without editing this file, and counts as a writing route (rw key only) until it
is declared read-only or public here."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from serving import KEYS, RO, RW, tiny_model

from facelab.serve import ServeConfig, create_app
from facelab.serve.security import FailureLimiter

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PUBLIC = {("get", "/healthz")}  # the liveness probe answers without a key
READ_ONLY = {
    ("get", "/v1/info"),
    ("post", "/v1/embed"),
    ("post", "/v1/verify"),
    ("post", "/v1/identify"),
    ("get", "/v1/identities"),
    ("get", "/v1/people"),
    ("get", "/v1/people/{person}/faces"),
    ("get", "/v1/people/{person}/photos"),
    ("get", "/v1/faces/{face}/thumbnail"),
}
# Writing routes known today (the rw key only; any route not declared above counts as one).
WRITING = {
    ("post", "/v1/enroll"),
    ("delete", "/v1/identities/{name}"),
    ("post", "/v1/people/{person}/name"),
    ("post", "/v1/people/{person}/merge"),
    ("post", "/v1/faces/{face}/move"),
    ("post", "/v1/faces/{face}/ignore"),
    ("post", "/v1/people/undo"),
}
# Outside the OpenAPI document: the page and FastAPI's own documentation, static and keyless.
PAGES = {"/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

WRONG_KEYS = {
    "no key": {},
    "unknown X-API-Key": {"X-API-Key": "wrong-key-0123456789abcdef"},
    "unknown bearer token": {"Authorization": "Bearer wrong-key-0123456789abcdef"},
    "a valid key in another scheme": {"Authorization": f"Basic {RW}"},
    "a key's prefix": {"X-API-Key": RW[:-1]},
}
READ_KEYS = {
    "ro as X-API-Key": {"X-API-Key": RO},
    "ro as bearer": {"Authorization": f"Bearer {RO}"},
}
WRITE_KEYS = {
    "rw as X-API-Key": {"X-API-Key": RW},
    "rw as bearer": {"Authorization": f"Bearer {RW}"},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    gallery = tmp_path_factory.mktemp("auth") / "gallery.db"
    # Every wrong key must be answered 401 here; throttling them is test_hostile's subject.
    unthrottled = FailureLimiter(limit=1_000_000)
    app = create_app(
        tiny_model(), ServeConfig(gallery=gallery, keys=KEYS, key_failures=unthrottled)
    )
    with TestClient(app) as c:
        yield c


def operations(client: TestClient) -> dict[tuple[str, str], dict]:
    """(method, path template) -> its OpenAPI operation, for every operation of the schema."""
    paths = client.app.openapi()["paths"]
    return {(method, path): op for path, ops in paths.items() for method, op in ops.items()}


def call(
    client: TestClient, method: str, path: str, op: dict, headers: dict[str, str]
) -> httpx.Response:
    """The operation with its path parameters filled in (a valid name) and no body: the key is
    checked before anything else about the request."""
    params = {p["name"]: "Ada" for p in op.get("parameters", []) if p["in"] == "path"}
    return client.request(method, path.format(**params), headers=headers)


def test_the_declared_routes_exist(client: TestClient) -> None:
    ops = operations(client)
    assert PUBLIC | READ_ONLY <= set(ops), (PUBLIC | READ_ONLY) - set(ops)
    assert WRITING <= set(ops), WRITING - set(ops)


def test_every_route_is_in_the_schema_or_a_keyless_page(client: TestClient) -> None:
    documented = {path for _, path in operations(client)}
    for route in client.app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            assert route.path in documented, route.path
            continue
        assert route.path in PAGES, f"{route.path}: undocumented route, not a known page"
        assert route.methods <= {"GET", "HEAD"}, route.path
        if "{" not in route.path:
            assert client.get(route.path).status_code == 200, route.path


def test_every_operation_refuses_a_missing_or_wrong_key(
    client: TestClient, subtests: pytest.Subtests
) -> None:
    for (method, path), op in operations(client).items():
        if (method, path) in PUBLIC:
            assert call(client, method, path, op, {}).status_code == 200, path
            continue
        with subtests.test(msg=f"{method.upper()} {path}: the schema asks for a key"):
            assert op.get("security") == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
            assert "401" in op["responses"]
        for case, headers in WRONG_KEYS.items():
            with subtests.test(msg=f"{method.upper()} {path} with {case}"):
                r = call(client, method, path, op, headers)
                assert r.status_code == 401, r.text
                assert r.json()["error"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"


def test_a_read_only_key_reads_but_never_writes(
    client: TestClient, subtests: pytest.Subtests
) -> None:
    for (method, path), op in operations(client).items():
        if (method, path) in PUBLIC:
            continue
        writing = (method, path) not in READ_ONLY
        for case, headers in {**READ_KEYS, **WRITE_KEYS}.items():
            with subtests.test(msg=f"{method.upper()} {path} with {case}"):
                r = call(client, method, path, op, headers)
                if writing and headers in READ_KEYS.values():
                    assert (r.status_code, r.json()["error"]) == (403, "forbidden"), r.text
                    assert "403" in op["responses"], path
                else:  # past the key check: whatever else the empty request gets, not 401/403
                    assert r.status_code not in (401, 403), r.text
