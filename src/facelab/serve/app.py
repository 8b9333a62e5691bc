"""`facelab serve`: the HTTP API and the browser page, over the same public functions as the CLI.

Every endpoint but `/healthz`, `/` and the OpenAPI document needs an API key (`security.py`);
`ro` keys may embed, verify, identify and list, `rw` keys may also enroll and delete. Bodies
are multipart uploads or base64 JSON (`inputs.py`), capped in bytes (413), images are checked
against a pixel limit from their header before decoding (413) and refused when they are not
images (415/422). Every error is JSON `{"error": code, "detail": sentence}`. Uploaded images
live in memory only, unless an enrollment asks to keep them (written under `keep_dir`).

The model sits behind dynamic batching queues (`batching.py`); requests run in worker threads
and call `find_faces`, `enroll`, `verify_claim` and `identify` from `facelab.gallery`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
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

from facelab.data.folders import IMAGE_SUFFIXES
from facelab.data.images import ImageError
from facelab.fileio import atomic_write
from facelab.gallery import (
    GalleryError,
    GalleryStore,
    ModelInfo,
    Threshold,
    enroll,
    find_faces,
    identify,
    verify_claim,
)
from facelab.gallery.service import Face, Identification, resolve_threshold
from facelab.models.export import OnnxFaceModel
from facelab.models.face_model import FaceModel
from facelab.models.preprocess import LANDMARK_ALIGNMENTS
from facelab.models.registry import DETECTORS
from facelab.pipeline import ROUTES
from facelab.serve.batching import BatchedDetector, BatchedFaceModel
from facelab.serve.inputs import ApiError, BodySpec, ImageField, Upload, decode_uploads
from facelab.serve.security import ApiKeys, BodyLimit, KeyConfigError

log = logging.getLogger(__name__)

# Identity names: letters, digits, space, _ . ' - ; starting and ending with a letter, digit or
# one of _ . ' (so never "", ".", "..", a path separator or surrounding blanks).
NAME_PATTERN = r"^\w(?:[\w .'-]{0,98}[\w.'-])?$"
NoFace = Literal["error", "skip", "whole_frame", "centre"]
Similarity = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]
Far = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


@dataclass(frozen=True)
class ServeConfig:
    """What the server needs besides the model; the defaults suit a small deployment."""

    gallery: Path
    keys: ApiKeys = ApiKeys()
    insecure_local: bool = False  # no key needed; `run` then binds 127.0.0.1 only
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 24_000_000
    max_images: int = 10
    max_batch: int = 8  # 1 = no batching: one model call per face, one at a time
    max_wait_ms: float = 5.0
    keep_dir: Path | None = None  # where enrollments asking to keep images write them
    model_source: str | None = None  # recorded in the gallery (how to load the model again)


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
    far: Far | None = Field(None, description="use the gallery's threshold for this target FAR")
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


class VerifyOut(BaseModel):
    score: float = Field(description="cosine similarity")
    decision: Literal["same", "different", "accept", "reject"] | None
    threshold: ThresholdOut | None
    identity: str | None = Field(description="the claimed identity, for a claim")
    faces: list[FaceOut]


class MatchOut(BaseModel):
    identity: str
    score: float


class IdentifiedFace(FaceOut):
    identity: str = Field(description="the best candidate, or 'unknown' under the threshold")
    score: float
    candidates: list[MatchOut]


class IdentifyOut(BaseModel):
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
    limits: dict[str, int]
    thresholds: list[ThresholdOut]


class HealthOut(BaseModel):
    status: str


ERRORS = {
    401: "no API key, or an unknown one",
    403: "a read-only key on a write endpoint",
    404: "no such identity",
    409: "the name is already enrolled",
    413: "body over the upload limit, or an image over the pixel limit",
    415: "body or part that is not JSON, multipart or an image",
    422: "invalid request, undecodable image, no face found, or no threshold",
}


# Either header carries the key; declared here so the OpenAPI document lists both schemes.
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False)
BEARER = HTTPBearer(auto_error=False)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorOut, "description": ERRORS[c]} for c in codes}


# -- the application ----------------------------------------------------------------------------


def _face_out(field: str, face: Face | Identification) -> dict[str, Any]:
    box = list(face.box) if face.box is not None else None
    return {"image": field, "face": face.face, "box": box, "route": face.route}


def _kept_name(upload: Upload) -> str:
    """Content-addressed file name, with the client's suffix when it is an image suffix."""
    suffix = Path(upload.filename).suffix.lower()
    digest = hashlib.sha256(upload.data).hexdigest()[:24]
    return digest + (suffix if suffix in IMAGE_SUFFIXES else ".img")


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
    served = BatchedFaceModel(model, config.max_batch, wait)
    detector: BatchedDetector | None = None
    if model.preprocess.alignment in LANDMARK_ALIGNMENTS:
        detector = BatchedDetector(DETECTORS.create("mtcnn"), config.max_batch, wait)
    info = ModelInfo.of(served)
    with GalleryStore(config.gallery, create=True) as store:
        store.check_model(info)
        if config.model_source:
            store.set_model_source(config.model_source)
    keep_dir = config.keep_dir or config.gallery.with_name(config.gallery.name + ".images")
    page = resources.files("facelab.serve").joinpath("static/index.html").read_bytes()
    page_policy = _content_security_policy(page)
    limits = {
        "max_upload_bytes": config.max_upload_bytes,
        "max_pixels": config.max_pixels,
        "max_images": config.max_images,
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
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

    def require(role: str) -> Callable[..., None]:
        def check(
            key: Annotated[str | None, Depends(API_KEY)],
            token: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        ) -> None:
            if config.insecure_local:
                return
            granted = config.keys.role(key or (token.credentials if token else None))
            if granted is None:
                raise ApiError(401, "unauthorized", "send a valid API key as X-API-Key")
            if role == "rw" and granted != "rw":
                raise ApiError(403, "forbidden", "this key is read-only")

        return check

    read, write = Depends(require("ro")), Depends(require("rw"))

    # -- errors ---------------------------------------------------------------------------------

    def error(status: int, code: str, detail: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": code, "detail": detail}, status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.error, exc.detail)

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
        return response

    # -- routes ---------------------------------------------------------------------------------

    async def body(request: Request, spec: BodySpec) -> tuple[Any, list[Upload]]:
        return await spec.parse(request, config.max_images, config.max_upload_bytes)

    def kept_folder(name: str) -> Path:
        """keep_dir/NAME, checked to be directly inside keep_dir (names are validated too)."""
        folder = (keep_dir / name).resolve()
        if folder.parent != keep_dir.resolve():
            raise ApiError(422, "invalid_request", f"{name!r}: not a valid name")
        return folder

    def operation(spec: BodySpec, *codes: int) -> dict[str, Any]:
        return {
            "openapi_extra": {"requestBody": spec.openapi(config.max_images)},
            "responses": _responses(401, 403, 413, 415, 422, *codes),
        }

    @app.get("/healthz", response_model=HealthOut)
    def healthz() -> HealthOut:
        return HealthOut(status="ok")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": page_policy})

    @app.get("/v1/info", response_model=InfoOut, dependencies=[read], responses=_responses(401))
    def model_info() -> InfoOut:
        """The served model, batching statistics, limits and the gallery's thresholds."""
        with GalleryStore(config.gallery) as store:
            thresholds = [ThresholdOut.of(t) for t in store.thresholds()]
        batching: dict[str, Any] = {
            "max_batch": config.max_batch,
            "max_wait_ms": config.max_wait_ms,
            "embed": served.queue.stats.to_dict(),
        }
        if detector is not None:
            batching["detect"] = detector.queue.stats.to_dict()
        return InfoOut(
            model=info.name,
            fingerprint=info.fingerprint,
            embedding_dim=info.embedding_dim,
            alignment=served.preprocess.alignment,
            runtime="onnx" if isinstance(model, OnnxFaceModel) else "torch",
            batching=batching,
            limits=limits,
            thresholds=thresholds,
        )

    @app.post("/v1/embed", response_model=EmbedOut, dependencies=[read], **operation(EMBED))
    async def embed(request: Request) -> EmbedOut:
        """Embeddings (L2-normalised) and boxes of the faces in one image."""
        opts, uploads = await body(request, EMBED)

        def work() -> EmbedOut:
            images = decode_uploads(uploads, config.max_pixels)
            faces = find_faces(
                served, images, all_faces=opts.all_faces, no_face=opts.no_face, detector=detector
            )
            return EmbedOut(
                model=info.name,
                fingerprint=info.fingerprint,
                faces=[
                    EmbeddedFace(**_face_out("image", f), embedding=f.embedding.tolist())
                    for f in faces
                ],
            )

        return await run_in_threadpool(work)

    @app.post("/v1/verify", response_model=VerifyOut, dependencies=[read], **operation(VERIFY, 404))
    async def verify(request: Request) -> VerifyOut:
        """1:1: are `image_a` and `image_b` the same person, or is `image` the enrolled
        `identity`? The threshold is the one given, else the gallery's calibrated one (for
        two images without either, only the score is returned)."""
        opts, uploads = await body(request, VERIFY)
        fields = [u.field for u in uploads]
        if fields == ["image"] and opts.identity is not None:
            return await run_in_threadpool(claim, opts, uploads)
        if fields == ["image_a", "image_b"] and opts.identity is None:
            return await run_in_threadpool(compare, opts, uploads)
        raise ApiError(422, "invalid_request", "send image_a and image_b, or image and identity")

    def compare(opts: VerifyOptions, uploads: list[Upload]) -> VerifyOut:
        images = decode_uploads(uploads, config.max_pixels)
        faces = find_faces(served, images, no_face=opts.no_face, detector=detector)
        missing = sorted({0, 1} - {f.item for f in faces})
        if missing:
            raise ApiError(422, "no_face", f"no face found in {uploads[missing[0]].field}")
        score = float(faces[0].embedding @ faces[1].embedding)
        given = opts.threshold is not None or opts.far is not None
        with GalleryStore(config.gallery) as store:
            threshold = None
            if given or store.thresholds():
                threshold = resolve_threshold(store, opts.threshold, opts.far)
        decision = None
        if threshold is not None:
            decision = "same" if score >= threshold.value else "different"
        return VerifyOut(
            score=score,
            decision=decision,
            threshold=ThresholdOut.of(threshold) if threshold else None,
            identity=None,
            faces=[FaceOut(**_face_out(uploads[f.item].field, f)) for f in faces],
        )

    def claim(opts: VerifyOptions, uploads: list[Upload]) -> VerifyOut:
        images = decode_uploads(uploads, config.max_pixels)
        with GalleryStore(config.gallery) as store:
            if opts.identity not in {i.name for i in store.identities()}:
                raise ApiError(404, "not_found", f"{opts.identity!r} is not enrolled")
            result = verify_claim(
                store,
                served,
                opts.identity,
                images[0],
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
        )

    @app.post(
        "/v1/identify", response_model=IdentifyOut, dependencies=[read], **operation(IDENTIFY)
    )
    async def identify_faces(request: Request) -> IdentifyOut:
        """1:N, open set: the top-k enrolled identities of each face, and the decision (the
        best one if its score reaches the threshold, else "unknown")."""
        opts, uploads = await body(request, IDENTIFY)

        def work() -> IdentifyOut:
            images = decode_uploads(uploads, config.max_pixels)
            with GalleryStore(config.gallery) as store:
                chosen = resolve_threshold(store, opts.threshold, opts.far)
                if not store.identities():
                    raise ApiError(422, "empty_gallery", "nobody is enrolled yet")
                results = identify(
                    store,
                    served,
                    images,
                    k=opts.k,
                    threshold=opts.threshold,
                    far=opts.far,
                    all_faces=opts.all_faces,
                    no_face=opts.no_face,
                    detector=detector,
                )
            return IdentifyOut(
                faces=[
                    IdentifiedFace(
                        **_face_out("image", r),
                        identity=r.identity,
                        score=r.score,
                        candidates=[
                            MatchOut(identity=m.identity, score=m.score) for m in r.candidates
                        ],
                    )
                    for r in results
                ],
                threshold=ThresholdOut.of(chosen),
            )

        return await run_in_threadpool(work)

    @app.post(
        "/v1/enroll", response_model=EnrollOut, dependencies=[write], **operation(ENROLL, 409)
    )
    async def enroll_person(request: Request) -> EnrollOut:
        """Enroll one person from one or a few photos (refused if the name is enrolled, unless
        `append`). Photos are kept on the server only with `keep_images`."""
        opts, uploads = await body(request, ENROLL)
        return await run_in_threadpool(enroll_uploads, opts, uploads)

    def enroll_uploads(opts: EnrollOptions, uploads: list[Upload]) -> EnrollOut:
        images = decode_uploads(uploads, config.max_pixels)  # refuse bad images before keeping
        with GalleryStore(config.gallery) as store:
            if not opts.append and opts.name in {i.name for i in store.identities()}:
                raise ApiError(409, "conflict", f"{opts.name!r} is already enrolled")
        kept: list[Path] = []
        items: list[Any] = images
        if opts.keep_images:
            new = [kept_folder(opts.name) / _kept_name(u) for u in uploads]
            for path, upload in zip(new, uploads, strict=True):
                if not path.exists():
                    atomic_write(path, lambda fh, data=upload.data: fh.write(data))
                    kept.append(path)
            items = new
        try:
            report = enroll(
                config.gallery,
                served,
                opts.name,
                items,
                append=opts.append,
                all_faces=opts.all_faces,
                no_face=opts.no_face,
                detector=detector,
                progress=False,
            )
        except BaseException:
            for path in kept:  # nothing enrolled: keep nothing new either
                path.unlink(missing_ok=True)
            raise
        faces = report.enrolled.get(opts.name, 0)
        if faces == 0:
            raise ApiError(422, "no_face", "no face found in any image: nothing enrolled")
        return EnrollOut(
            identity=opts.name,
            faces=faces,
            images=len(uploads),
            kept=[p.relative_to(keep_dir.resolve()).as_posix() for p in kept],
        )

    @app.get(
        "/v1/identities",
        response_model=IdentitiesOut,
        dependencies=[read],
        responses=_responses(401),
    )
    def identities() -> IdentitiesOut:
        with GalleryStore(config.gallery) as store:
            return IdentitiesOut(identities=[IdentityOut(**asdict(i)) for i in store.identities()])

    @app.delete(
        "/v1/identities/{name}",
        response_model=RemovedOut,
        dependencies=[write],
        responses=_responses(401, 403, 404, 422),
    )
    def remove(name: Annotated[str, PathParam(pattern=NAME_PATTERN)]) -> RemovedOut:
        """Delete an identity, its embeddings and the image files kept for it."""
        with GalleryStore(config.gallery) as store:
            if name not in {i.name for i in store.identities()}:
                raise ApiError(404, "not_found", f"{name!r} is not enrolled")
            images = store.remove(name)
        folder = kept_folder(name)
        files = 0
        if folder.is_dir():
            files = sum(1 for p in folder.iterdir() if p.is_file())
            shutil.rmtree(folder)
        return RemovedOut(removed=name, images=images, files=files)

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def run(model: FaceModel, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve with uvicorn until interrupted; without keys (`insecure_local`) on loopback only."""
    import uvicorn

    if config.insecure_local and host not in LOOPBACK:
        raise KeyConfigError(f"--insecure-local serves on 127.0.0.1 only, not on {host}")
    app = create_app(model, config)
    log.info("serving %s on http://%s:%d (API docs at /docs)", model.name, host, port)
    uvicorn.run(app, host=host, port=port, server_header=False, log_level="info")
