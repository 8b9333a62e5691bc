"""`facelab serve`: the HTTP API and the browser page, over the same public functions as the CLI.

Every endpoint but `/healthz`, `/` and the OpenAPI document needs an API key (`security.py`);
`ro` keys may embed, verify, identify and list, `rw` keys may also enroll and delete. Bodies
are multipart uploads or base64 JSON (`inputs.py`), capped in bytes (413), images are checked
against a pixel limit from their header before decoding (413) and refused when they are not
images (415/422). Every error is JSON `{"error": code, "detail": sentence}`, naming no server
path. Uploaded images live in memory only, unless an enrollment asks to keep them (written
under `keep_dir`, `kept.py`). Work per request is bounded (`limits.py`), requests from other
sites and to other host names are refused, and so are clients sending wrong keys too often
(`security.py`); docs/security.md describes the whole model.

The model sits behind dynamic batching queues (`batching.py`); requests run in worker threads
and call `find_faces`, `enroll`, `verify_claim` and `identify` from `facelab.gallery`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from facelab.collections.library import Library, LibraryError, LibraryNotFound
from facelab.data.images import ImageError
from facelab.gallery import (
    GalleryError,
    GalleryStore,
    ModelInfo,
    Threshold,
    backends,
    enroll,
    find_faces,
    identify,
    verify_claim,
)
from facelab.gallery.postgres import GalleryUnavailable, is_postgres_address
from facelab.gallery.replica import GalleryReplica, OfflineGallery
from facelab.gallery.service import Face, Identification, resolve_threshold
from facelab.gallery.store import GalleryBusy, GalleryConflict
from facelab.models.export import OnnxFaceModel
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import LANDMARK_ALIGNMENTS
from facelab.pipeline import ROUTES, make_detector
from facelab.serve import kept
from facelab.serve.batching import BatchedDetector, BatchedFaceModel, InFlight
from facelab.serve.inputs import NAME_PATTERN, ApiError, BodySpec, ImageField, Upload
from facelab.serve.limits import Decoded, WorkLimits, deadline, decode_uploads
from facelab.serve.people import add_people_routes
from facelab.serve.security import (
    LOOPBACK_HOSTS,
    ApiKeys,
    BodyLimit,
    FailureLimiter,
    HeaderTimeoutProtocol,
    KeyConfigError,
    SameOrigin,
)

log = logging.getLogger(__name__)

NoFace = Literal["error", "skip", "whole_frame", "centre"]
Similarity = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
Far = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


@dataclass(frozen=True)
class ServeConfig:
    """What the server needs besides the model; the defaults suit a small deployment."""

    gallery: backends.GalleryAddress  # a file, or postgresql://... shared by several replicas
    keys: ApiKeys = ApiKeys()
    insecure_local: bool = False  # no key needed; `run` then binds 127.0.0.1 only
    library: bool = False  # the gallery file is a photo library: serve its People routes too
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 24_000_000  # per image, from its header
    # bounded work per request (limits.py): pixels of all images, the working size images
    # are reduced to before detection, faces per image, and seconds
    max_request_pixels: int = 100_000_000
    max_side: int = 1280
    max_faces: int = 20
    request_seconds: float = 60.0
    max_images: int = 10
    max_batch: int = 8  # 1 = no batching: one model call per face, one at a time
    max_wait_ms: float = 5.0
    keep_dir: Path | None = None  # where enrollments asking to keep images write them
    model_source: str | None = None  # recorded in the gallery (how to load the model again)
    search: str = "auto"  # the in-memory index's method (gallery.search.METHODS)
    snapshot_dir: Path | None = None  # where the replica saves its index (PostgreSQL only)
    search_options: dict[str, int] = field(default_factory=dict)  # gallery.search.OPTIONS
    # Host names the server answers to besides localhost, 127.0.0.1 and [::1]; with none,
    # a keyed server answers to any (the key is the protection), an insecure one to loopback.
    allowed_hosts: tuple[str, ...] = ()
    busy_seconds: float = 2.0  # wait for another process's gallery write lock, then 503
    read_seconds: float = 30.0  # to receive a request's body once its headers are in
    key_failures: FailureLimiter = field(default_factory=FailureLimiter)


# -- request options (the non-image fields of each body) ----------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedOptions(_Options):
    all_faces: bool = Field(
        False, description="every face (default: the main, large and central one)"
    )
    no_face: NoFace = Field("error", description="no face found: error, skip, or centre crop")


class _Decision(_Options):
    threshold: Similarity | None = Field(None, description="cosine threshold (default: calibrated)")
    far: Far | None = Field(
        None,
        description="decide at this target FAR: the gallery's calibrated threshold, else the "
        "model's operating point (default: the gallery's latest, else the model's FAR 1e-3)",
    )
    no_face: NoFace = "error"

    @model_validator(mode="after")
    def _one_threshold(self) -> _Decision:
        if self.threshold is not None and self.far is not None:
            raise ValueError("give a threshold or a target FAR, not both")
        return self


class VerifyOptions(_Decision):
    identity: str | None = Field(
        None, pattern=NAME_PATTERN, description="claimed identity (with `image`)"
    )


class IdentifyOptions(_Decision):
    k: int = Field(5, ge=1, le=100, description="candidates per face")
    all_faces: bool = False


class EnrollOptions(_Options):
    name: str = Field(pattern=NAME_PATTERN, description="the person's name")
    append: bool = Field(False, description="add images to a name already enrolled")
    all_faces: bool = False
    no_face: NoFace = "error"
    keep_images: bool = Field(False, description="keep the uploaded files on the server")


IMAGE = ImageField("image", "the image (JPEG, PNG, ...)")
EMBED = BodySpec(EmbedOptions, (IMAGE,))
VERIFY = BodySpec(
    VerifyOptions,
    (
        ImageField("image_a", "first of two images to compare", required=False),
        ImageField("image_b", "second of two images to compare", required=False),
        ImageField("image", "image of the claimed `identity`", required=False),
    ),
)
IDENTIFY = BodySpec(IdentifyOptions, (IMAGE,))
ENROLL = BodySpec(EnrollOptions, (ImageField("images", "one or a few photos", many=True),))


# -- responses ----------------------------------------------------------------------------------


class ErrorOut(BaseModel):
    error: str
    detail: str


class ThresholdOut(BaseModel):
    value: float
    source: str
    target_far: float | None
    measured_far: float | None
    measured_frr: float | None
    n_genuine: int
    n_impostor: int
    reason: str

    @classmethod
    def of(cls, t: Threshold) -> ThresholdOut:
        return cls(**asdict(t), reason=t.describe())


Box = Annotated[list[float], Field(min_length=4, max_length=4, description="x1, y1, x2, y2")]


class FaceOut(BaseModel):
    image: str = Field(description="the image field the face was found in")
    face: int = Field(description="0 = the main face of the image (large and central)")
    box: Box | None = Field(description="null: the centre crop was taken as the face")
    route: str = Field(description=f"how the face was found, one of {', '.join(ROUTES)}")


class EmbeddedFace(FaceOut):
    embedding: list[float]


class EmbedOut(BaseModel):
    model: str
    fingerprint: str
    faces: list[EmbeddedFace]


class Freshness(BaseModel):
    """How current the gallery an answer came from was: a replica that lost its database
    answers from the index it holds, at `revision`, marked stale."""

    stale: bool = Field(
        False, description="answered from this replica's index without its database"
    )
    revision: int | None = Field(None, description="the gallery revision the answer reflects")
    stale_for_s: float | None = Field(None, description="seconds since the database was lost")


class VerifyOut(Freshness):
    score: float = Field(description="cosine similarity")
    decision: Literal["same", "different", "accept", "reject"] | None
    threshold: ThresholdOut | None
    no_threshold: str | None = Field(
        None, description="why there is no decision: no threshold is known (decision null)"
    )
    identity: str | None = Field(description="the claimed identity, for a claim")
    faces: list[FaceOut]


class MatchOut(BaseModel):
    identity: str
    score: float


class IdentifiedFace(FaceOut):
    identity: str = Field(description="the best candidate, or 'unknown' under the threshold")
    score: float
    candidates: list[MatchOut]


class IdentifyOut(Freshness):
    faces: list[IdentifiedFace]
    threshold: ThresholdOut


class EnrollOut(BaseModel):
    identity: str
    faces: int = Field(description="faces stored by this enrollment")
    images: int
    kept: list[str] = Field(description="files kept on the server (keep_images), by name")


class IdentityOut(BaseModel):
    name: str
    images: int
    created: float


class IdentitiesOut(BaseModel):
    identities: list[IdentityOut]


class RemovedOut(BaseModel):
    removed: str
    images: int = Field(description="embeddings deleted")
    files: int = Field(description="kept image files deleted")


class InfoOut(BaseModel):
    model: str
    fingerprint: str
    embedding_dim: int
    alignment: str
    runtime: str
    batching: dict[str, Any]
    limits: dict[str, int | float]
    thresholds: list[ThresholdOut]
    gallery: dict[str, Any]  # backend, revision served, stale (and since when, why)
    library: dict[str, int] | None = Field(
        None, description="the served photo library's counts (null: no library, no People view)"
    )


class HealthOut(BaseModel):
    status: str


ERRORS = {
    400: "a JSON body that does not parse",
    401: "no API key, or an unknown one",
    403: "a read-only key on a write endpoint, or a request made by a page of another site",
    404: "no such identity, person or face, or no library served",
    408: "the body did not arrive in time",
    409: "the name is already enrolled",
    413: "body over the upload limit, or images over the pixel limits",
    415: "body or part that is not JSON, multipart or an image",
    422: "invalid request, undecodable image, no face found, or no threshold",
    429: "too many wrong keys from this client; retry after Retry-After seconds",
    503: "gallery busy (another process is writing), or request over its time limit",
}


# Either header carries the key; declared here so the OpenAPI document lists both schemes.
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False)
BEARER = HTTPBearer(auto_error=False)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorOut, "description": ERRORS[c]} for c in codes}


# -- the application ----------------------------------------------------------------------------


def _face_out(
    field: str, face: Face | Identification, box: tuple[float, ...] | None
) -> dict[str, Any]:
    """A face of a reply: `box` in the uploaded image's pixels (the detector saw it reduced)."""
    return {
        "image": field,
        "face": face.face,
        "box": list(box) if box is not None else None,
        "route": face.route,
    }


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"()<>]+/)+([^\s/'\"()<>]*)")


def _public(detail: str, paths: dict[str, str]) -> str:
    """An error sentence fit for a client: the server's own paths (`paths`: path -> what to
    show) and any other absolute path shortened to its last part, object addresses dropped."""
    for path, shown in sorted(paths.items(), key=lambda p: -len(p[0])):
        detail = detail.replace(path, shown)
    return _ABSOLUTE_PATH.sub(r"\1", _ADDRESS.sub("", detail))


def _content_security_policy(page: bytes) -> str:
    """The page may run its own inline script (by hash) and talk to this server only; nothing
    injected into it would run, and no other site may frame it."""
    script = re.search(rb"<script>(.*?)</script>", page, re.DOTALL)
    if script is None:
        raise ValueError("the page has no inline script")
    digest = base64.b64encode(hashlib.sha256(script.group(1)).digest()).decode()
    return (
        f"default-src 'self'; script-src 'sha256-{digest}'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' blob: data:; frame-ancestors 'none'"
    )


def create_app(model: FaceModel, config: ServeConfig) -> FastAPI:
    """The ASGI application serving `model` with the gallery at `config.gallery`."""
    if not config.keys.roles and not config.insecure_local:
        raise KeyConfigError(
            "no API key configured: set FACELAB_API_KEYS or give a key file "
            "(or, for a local trial only, --insecure-local)"
        )
    wait = config.max_wait_ms / 1000
    work = WorkLimits(
        config.max_pixels,
        config.max_request_pixels,
        config.max_side,
        config.max_faces,
        config.request_seconds,
    )
    in_flight = InFlight()  # requests doing model work: the batches wait only for those
    served = BatchedFaceModel(model, config.max_batch, wait, callers=in_flight)
    detector: BatchedDetector | None = None
    if model.preprocess.alignment in LANDMARK_ALIGNMENTS:
        detector = BatchedDetector(
            make_detector(model.preprocess),
            config.max_batch,
            wait,
            max_faces=work.max_faces,
            callers=in_flight,
        )
    info = ModelInfo.of(served)
    keep_dir = config.keep_dir or _default_keep_dir(config.gallery)
    if config.library:
        if is_postgres_address(config.gallery):
            raise LibraryError("a photo library is a file, not a database address")
        with Library(config.gallery) as lib:  # refuses a missing file or a plain gallery
            lib.bind_model(info, config.model_source)  # and a model other than the library's
    with backends.open_store(config.gallery, create=True) as store:
        store.check_model(info)
        if config.model_source:
            store.set_model_source(config.model_source)
        kept.reconcile(store, keep_dir)
    replica = GalleryReplica(
        config.gallery, config.search, snapshot_dir=config.snapshot_dir, **config.search_options
    )
    page = resources.files("facelab.serve").joinpath("static/index.html").read_bytes()
    page_policy = _content_security_policy(page)
    limits = {
        "max_upload_bytes": config.max_upload_bytes,
        "max_images": config.max_images,
        "max_pixels": config.max_pixels,
        "max_request_pixels": config.max_request_pixels,
        "max_side": config.max_side,
        "max_faces": config.max_faces,
        "request_seconds": config.request_seconds,
    }
    hosts = (*LOOPBACK_HOSTS, *config.allowed_hosts)
    if not config.allowed_hosts and not config.insecure_local:
        hosts = ()  # keyed, no names configured: any host name (the key protects)
    server_paths = {
        str(p): p.name
        for base in (config.gallery, keep_dir)
        if not is_postgres_address(base)
        for p in (Path(base), Path(base).resolve(), Path(base).parent.resolve())
    }

    def open_store(create: bool = False) -> GalleryStore:
        """The gallery, waiting at most `busy_seconds` for another writer (then 503)."""
        return backends.open_store(config.gallery, create=create, timeout=config.busy_seconds)

    def open_library() -> Library:
        """The served library, waiting at most `busy_seconds` for another writer (then 503)."""
        if not config.library:
            raise ApiError(
                404,
                "no_library",
                "this server serves no photo library (start it with facelab serve --library FILE)",
            )
        return Library(config.gallery, timeout=config.busy_seconds)

    def reading_store() -> GalleryStore:
        """The gallery for answering searches: the database, or, while this replica has no
        connection to it, what the replica holds (answers then say they are stale)."""
        if replica.status().connected:
            try:
                return open_store()
            except GalleryUnavailable as exc:
                log.info("answering from the replica's index: %s", exc)
        return replica.offline()

    def freshness(store: GalleryStore) -> dict[str, Any]:
        status = replica.status()
        stale = isinstance(store, OfflineGallery) or status.stale
        since = status.stale_since if stale else None
        return {
            "stale": stale,
            "revision": status.revision,
            "stale_for_s": None if since is None else round(time.time() - since, 3),
        }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        replica.close()
        served.queue.close()
        if detector is not None:
            detector.queue.close()

    app = FastAPI(
        title="facelab",
        version="1",
        description=__doc__.split("\n\n")[1],
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=config.max_upload_bytes)
    app.add_middleware(SameOrigin, hosts=hosts)

    def require(role: str) -> Callable[..., None]:
        def check(
            request: Request,
            key: Annotated[str | None, Depends(API_KEY)],
            token: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        ) -> None:
            if config.insecure_local:
                return
            client = request.client.host if request.client else "unknown"
            wait = config.key_failures.retry_after(client)
            if wait > 0:
                raise ApiError(
                    429,
                    "too_many_failures",
                    f"too many wrong keys from this address; retry in {math.ceil(wait)} s",
                    headers={"Retry-After": str(math.ceil(wait))},
                )
            granted = config.keys.role(key or (token.credentials if token else None))
            if granted is None:
                config.key_failures.fail(client)
                raise ApiError(401, "unauthorized", "send a valid API key as X-API-Key")
            if role == "rw" and granted != "rw":
                raise ApiError(403, "forbidden", "this key is read-only")

        return check

    read, write = Depends(require("ro")), Depends(require("rw"))

    # -- errors ---------------------------------------------------------------------------------

    def error(
        status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        headers = {**(headers or {}), **({"WWW-Authenticate": "Bearer"} if status == 401 else {})}
        body = {"error": code, "detail": _public(detail, server_paths)}
        return JSONResponse(body, status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(GalleryBusy)
    async def _busy(_: Request, exc: GalleryBusy) -> JSONResponse:
        detail = "gallery busy: another process is writing to it; try again shortly"
        return error(503, "gallery_busy", detail, {"Retry-After": "1"})

    @app.exception_handler(LibraryNotFound)
    async def _not_found(_: Request, exc: LibraryNotFound) -> JSONResponse:
        return error(404, "not_found", str(exc))

    @app.exception_handler(GalleryConflict)
    async def _conflict(_: Request, exc: GalleryConflict) -> JSONResponse:
        return error(409, "conflict", str(exc))

    @app.exception_handler(GalleryUnavailable)
    async def _unavailable(_: Request, exc: GalleryUnavailable) -> JSONResponse:
        return error(503, "gallery_unavailable", str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return error(422, "invalid_request", detail)

    @app.exception_handler(GalleryError)
    @app.exception_handler(ImageError)
    async def _refused(_: Request, exc: ValueError) -> JSONResponse:
        return error(422, "refused", str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error(500, "internal", "internal server error (logged)")

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable) -> Any:
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.url.path.startswith("/v1/"):
            response.headers["Cache-Control"] = "no-store"
        status = replica.status()  # the index identify answers from; stale: maybe behind
        response.headers["X-Gallery-Revision"] = str(status.revision)
        response.headers["X-Gallery-Stale"] = "true" if status.stale else "false"
        return response

    # -- routes ---------------------------------------------------------------------------------

    async def body(request: Request, spec: BodySpec) -> tuple[Any, list[Upload]]:
        return await spec.parse(
            request, config.max_images, config.max_upload_bytes, config.read_seconds
        )

    async def bounded(fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker thread, held to the request time limit."""

        def run_with_deadline() -> Any:
            with deadline(work.seconds), in_flight:
                return fn(*args)

        return await run_in_threadpool(run_with_deadline)

    def decode(uploads: list[Upload]) -> list[Decoded]:
        return decode_uploads(uploads, work)

    def kept_folder(name: str) -> Path:
        """keep_dir/NAME, checked to be directly inside keep_dir (names are validated too)."""
        folder = (keep_dir / name).resolve()
        if folder.parent != keep_dir.resolve():
            raise ApiError(422, "invalid_request", f"{name!r}: not a valid name")
        return folder

    def operation(spec: BodySpec, *codes: int) -> dict[str, Any]:
        return {
            "openapi_extra": {"requestBody": spec.openapi(config.max_images)},
            "responses": _responses(401, 403, 408, 413, 415, 422, 429, 503, *codes),
        }

    @app.get("/healthz", response_model=HealthOut)
    def healthz() -> HealthOut:
        return HealthOut(status="ok")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": page_policy})

    @app.get(
        "/v1/info", response_model=InfoOut, dependencies=[read], responses=_responses(401, 429)
    )
    def model_info() -> InfoOut:
        """The served model, batching statistics, limits and the gallery's thresholds."""
        try:
            with reading_store() as store:
                thresholds = [ThresholdOut.of(t) for t in store.thresholds()]
        except GalleryUnavailable:
            thresholds = []  # unknown now; `gallery` says the replica is stale and why
        batching: dict[str, Any] = {
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "embed": served.queue.stats.to_dict(),
        }
        if detector is not None:
            batching["detect"] = detector.queue.stats.to_dict()
        library = None
        if config.library:
            with open_library() as lib:
                library = lib.stats()
        return InfoOut(
            model=info.name,
            fingerprint=info.fingerprint,
            embedding_dim=info.embedding_dim,
            alignment=served.preprocess.alignment,
            runtime="onnx" if isinstance(model, OnnxFaceModel) else "torch",
            batching=batching,
            limits=limits,
            thresholds=thresholds,
            gallery=asdict(replica.status()),
            library=library,
        )

    @app.post("/v1/embed", response_model=EmbedOut, dependencies=[read], **operation(EMBED))
    async def embed(request: Request) -> EmbedOut:
        """Embeddings (L2-normalised) and boxes of the faces in one image."""
        opts, uploads = await body(request, EMBED)

        def embed_faces() -> EmbedOut:
            images = decode(uploads)
            faces = find_faces(
                served,
                [d.image for d in images],
                all_faces=opts.all_faces,
                no_face=opts.no_face,
                detector=detector,
            )
            return EmbedOut(
                model=info.name,
                fingerprint=info.fingerprint,
                faces=[
                    EmbeddedFace(
                        **_face_out("image", f, images[f.item].original_box(f.box)),
                        embedding=f.embedding.tolist(),
                    )
                    for f in faces
                ],
            )

        return await bounded(embed_faces)

    @app.post("/v1/verify", response_model=VerifyOut, dependencies=[read], **operation(VERIFY, 404))
    async def verify(request: Request) -> VerifyOut:
        """1:1: are `image_a` and `image_b` the same person, or is `image` the enrolled
        `identity`? The threshold is the one given, else the gallery's calibrated one, else
        the model's operating point at FAR 1e-3 (for two images without any, only the score
        is returned, with `no_threshold` saying why)."""
        opts, uploads = await body(request, VERIFY)
        fields = [u.field for u in uploads]
        if fields == ["image"] and opts.identity is not None:
            return await bounded(claim, opts, uploads)
        if fields == ["image_a", "image_b"] and opts.identity is None:
            return await bounded(compare, opts, uploads)
        raise ApiError(422, "invalid_request", "send image_a and image_b, or image and identity")

    def compare(opts: VerifyOptions, uploads: list[Upload]) -> VerifyOut:
        images = decode(uploads)
        faces = find_faces(
            served, [d.image for d in images], no_face=opts.no_face, detector=detector
        )
        missing = sorted({0, 1} - {f.item for f in faces})
        if missing:
            raise ApiError(422, "no_face", f"no face found in {uploads[missing[0]].field}")
        score = float(faces[0].embedding @ faces[1].embedding)
        given = opts.threshold is not None or opts.far is not None
        threshold, no_threshold = None, None
        with reading_store() as store:
            try:
                threshold = resolve_threshold(store, opts.threshold, opts.far, served)
            except GalleryError as exc:
                if given:
                    raise
                no_threshold = str(exc)
        decision = None
        if threshold is not None:
            decision = "same" if score >= threshold.value else "different"
        return VerifyOut(
            score=score,
            decision=decision,
            threshold=ThresholdOut.of(threshold) if threshold else None,
            no_threshold=no_threshold,
            identity=None,
            faces=[
                FaceOut(**_face_out(uploads[f.item].field, f, images[f.item].original_box(f.box)))
                for f in faces
            ],
            **freshness(store),
        )

    def claim(opts: VerifyOptions, uploads: list[Upload]) -> VerifyOut:
        images = decode(uploads)
        with reading_store() as store:
            if not store.contains(opts.identity):
                raise ApiError(404, "not_found", f"{opts.identity!r} is not enrolled")
            result = verify_claim(
                store,
                served,
                opts.identity,
                images[0].image,
                threshold=opts.threshold,
                far=opts.far,
                no_face=opts.no_face,
                detector=detector,
            )
        return VerifyOut(
            score=result.score,
            decision="accept" if result.accepted else "reject",
            threshold=ThresholdOut.of(result.threshold),
            identity=result.identity,
            faces=[],
            **freshness(store),
        )

    @app.post(
        "/v1/identify", response_model=IdentifyOut, dependencies=[read], **operation(IDENTIFY)
    )
    async def identify_faces(request: Request) -> IdentifyOut:
        """1:N, open set: the top-k enrolled identities of each face, and the decision (the
        best one if its score reaches the threshold, else "unknown")."""
        opts, uploads = await body(request, IDENTIFY)

        def identify_faces() -> IdentifyOut:
            images = decode(uploads)
            with reading_store() as store:
                chosen = resolve_threshold(store, opts.threshold, opts.far, served)
                if store.is_empty():
                    raise ApiError(422, "empty_gallery", "nobody is enrolled yet")
                results = identify(
                    store,
                    served,
                    [d.image for d in images],
                    k=opts.k,
                    threshold=chosen.value,  # resolved above: identify need not look again
                    all_faces=opts.all_faces,
                    no_face=opts.no_face,
                    detector=detector,
                    search=replica,
                )
            return IdentifyOut(
                faces=[
                    IdentifiedFace(
                        **_face_out("image", r, images[0].original_box(r.box)),
                        identity=r.identity,
                        score=r.score,
                        candidates=[
                            MatchOut(identity=m.identity, score=m.score) for m in r.candidates
                        ],
                    )
                    for r in results
                ],
                threshold=ThresholdOut.of(chosen),
                **freshness(store),
            )

        return await bounded(identify_faces)

    @app.post(
        "/v1/enroll", response_model=EnrollOut, dependencies=[write], **operation(ENROLL, 409)
    )
    async def enroll_person(request: Request) -> EnrollOut:
        """Enroll one person from one or a few photos (refused if the name is enrolled, unless
        `append`). Photos are kept on the server only with `keep_images`."""
        opts, uploads = await body(request, ENROLL)
        return await bounded(enroll_uploads, opts, uploads)

    def enroll_uploads(opts: EnrollOptions, uploads: list[Upload]) -> EnrollOut:
        """Photos kept with `keep_images` and the gallery rows are one unit (`kept.py`): the
        files are written under pending names first and settled after the commit."""
        images = [d.image for d in decode(uploads)]  # refuse bad images before keeping
        with open_store(create=True) as store:
            if not opts.append and store.contains(opts.name):
                raise ApiError(409, "conflict", f"{opts.name!r} is already enrolled")
            pending: list[Path] = []
            if opts.keep_images:
                pending = kept.write_pending(kept_folder(opts.name), images, uploads)
            try:
                report = enroll(
                    store,
                    served,
                    opts.name,
                    images,
                    append=opts.append,
                    all_faces=opts.all_faces,
                    no_face=opts.no_face,
                    detector=detector,
                    progress=False,
                )
            except BaseException:
                for path in pending:  # nothing enrolled: keep nothing new either
                    path.unlink(missing_ok=True)
                raise
            files = kept.settle(store, opts.name, pending)
        replica.catch_up()  # this replica answers with the enrollment from the next request on
        faces = report.enrolled.get(opts.name, 0)
        if faces == 0:
            raise ApiError(422, "no_face", "no face found in any image: nothing enrolled")
        return EnrollOut(
            identity=opts.name,
            faces=faces,
            images=len(uploads),
            kept=sorted({p.relative_to(keep_dir.resolve()).as_posix() for p in files}),
        )

    @app.get(
        "/v1/identities",
        response_model=IdentitiesOut,
        dependencies=[read],
        responses=_responses(401, 429),
    )
    def identities() -> IdentitiesOut:
        with open_store() as store:
            return IdentitiesOut(identities=[IdentityOut(**asdict(i)) for i in store.identities()])

    @app.delete(
        "/v1/identities/{name}",
        response_model=RemovedOut,
        dependencies=[write],
        responses=_responses(401, 403, 404, 422, 429, 503),
    )
    def remove(name: Annotated[str, PathParam(pattern=NAME_PATTERN)]) -> RemovedOut:
        """Delete an identity, its embeddings and the image files kept for it."""
        with open_store() as store:
            if not store.contains(name):
                raise ApiError(404, "not_found", f"{name!r} is not enrolled")
            images = store.remove(name)
        replica.catch_up()
        folder = kept_folder(name)
        files = 0
        if folder.is_dir():
            files = sum(1 for p in folder.iterdir() if p.is_file())
            shutil.rmtree(folder)
        return RemovedOut(removed=name, images=images, files=files)

    add_people_routes(app, open_library, read, write, _responses, replica.catch_up)
    return app


def _default_keep_dir(gallery: backends.GalleryAddress) -> Path:
    """GALLERY.images beside a gallery file; for a database, DBNAME.images in the working
    folder (replicas on several machines need --keep-dir on a shared file system)."""
    if is_postgres_address(gallery):
        return Path(str(gallery).rsplit("/", 1)[-1].split("?")[0] + ".images")
    path = Path(gallery)
    return path.with_name(path.name + ".images")


KEEP_ALIVE_SECONDS = 5  # an idle keep-alive connection is closed after this


def run(model: FaceModel, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve with uvicorn until interrupted; without keys (`insecure_local`) on loopback only.
    Connections that send no request headers within 10 s are closed."""
    import uvicorn

    if config.insecure_local and host not in LOOPBACK_HOSTS:
        raise KeyConfigError(f"--insecure-local serves on 127.0.0.1 only, not on {host}")
    app = create_app(model, config)
    log.info("serving %s on http://%s:%d (API docs at /docs)", model.name, host, port)
    uvicorn.run(
        app,
        host=host,
        port=port,
        server_header=False,
        log_level="info",
        http=HeaderTimeoutProtocol,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
