"""The People routes of `facelab serve --library`: a photo library's people, their faces and
photos, and the curation actions, each a thin call into `facelab.collections`.

Reads need a read key, curation the read-write key. An unknown person or face is 404 (the
library's `LibraryNotFound`), any other refusal 422, like the rest of the API. The library is
opened per request in the worker thread that serves it (SQLite connections stay in their
thread); a curation that renames people also changes the library's gallery, so the server's
in-memory index catches up before the reply (`on_change`).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Query, Response
from fastapi import Path as PathParam
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from facelab.collections import people
from facelab.collections.library import Library
from facelab.collections.search import search_person
from facelab.serve.inputs import NAME_PATTERN

PersonRef = Annotated[
    StrictInt | Annotated[str, Field(min_length=1, max_length=200)],
    Field(description="a person's id, or name", examples=[3, "Ada Lovelace"]),
]
PersonParam = Annotated[str, PathParam(description="a person's id, or name")]
FaceParam = Annotated[int, PathParam(ge=1, description="a face's id")]
Limit = Annotated[int | None, Query(ge=1, le=10_000, description="at most this many")]
FaceId = Annotated[StrictInt, Field(ge=1)]
T = TypeVar("T")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NameIn(_Body):
    name: str = Field(pattern=NAME_PATTERN, description="the person's name")


class MergeIn(_Body):
    other: PersonRef = Field(description="the person whose faces move into this one")


class MoveIn(_Body):
    person: PersonRef | None = Field(description="the target person; null takes the face out")


class SplitIn(_Body):
    faces: list[FaceId] = Field(
        min_length=1, max_length=10_000, description="face ids of this person to split off"
    )


class PersonOut(BaseModel):
    id: int
    name: str | None = Field(description="null while an unnamed cluster")
    faces: int
    representative: int = Field(description="the face id that best shows the person")


class PeopleOut(BaseModel):
    library: dict[str, int] = Field(description="files, faces, people_named, clusters, ignored")
    people: list[PersonOut] = Field(description="named people first, then clusters; largest first")


class LibraryFaceOut(BaseModel):
    id: int
    path: str = Field(description="the photo, as indexed")
    face: int = Field(description="0 = the photo's main face")
    box: list[float] = Field(description="x1, y1, x2, y2 in the photo's pixels")
    landmarks: list[list[float]]
    det_score: float
    source: str = Field(
        description="the pipeline route that found the face: detected, upsampled, padded, ..."
    )
    quality: dict[str, float] = Field(description="score and its parts (docs/collections.md)")
    person_id: int | None
    pinned: bool
    ignored: bool
    thumbnail: str = Field(description="JPEG, base64")


class PersonFacesOut(BaseModel):
    person: int
    total: int = Field(description="the person's faces; `faces` holds the first `limit`")
    faces: list[LibraryFaceOut]


class FaceHitOut(BaseModel):
    face_id: int
    box: list[float]
    score: float


class PhotoOut(BaseModel):
    path: str
    score: float = Field(description="cosine of its best face to the person's mean face")
    faces: list[FaceHitOut]


class PhotosOut(BaseModel):
    photos: list[PhotoOut]


class DoneOut(BaseModel):
    done: str = Field(description="what was done (for undo: the action undone)")


class SplitOut(DoneOut):
    person: int = Field(description="the new person's id")


def add_people_routes(
    app: FastAPI,
    open_library: Callable[[], Library],
    read: Depends,
    write: Depends,
    errors: Callable[..., dict[int | str, dict[str, Any]]],
    on_change: Callable[[], Any],
) -> None:
    """The routes, over `open_library()` (which refuses when no library is served)."""
    reading = {"dependencies": [read], "responses": errors(401, 404, 422, 429, 503)}
    writing = {"dependencies": [write], "responses": errors(400, 401, 403, 404, 413, 422, 429, 503)}

    def apply(action: Callable[[Library], T]) -> T:
        """Run a curation, then let the served gallery catch up; returns what it returned."""
        with open_library() as lib:
            result = action(lib)
        on_change()
        return result

    def change(action: Callable[[Library], Any], done: str) -> DoneOut:
        apply(action)
        return DoneOut(done=done)

    @app.get("/v1/people", response_model=PeopleOut, **reading)
    def list_people(
        min_faces: Annotated[int, Query(ge=1, description="people with this many faces")] = 1,
    ) -> PeopleOut:
        """The library's people (clusters and named people) with a representative face."""
        with open_library() as lib:
            found = people.list_people(lib, min_faces)
            return PeopleOut(library=lib.stats(), people=[PersonOut(**asdict(p)) for p in found])

    @app.get("/v1/people/{person}/faces", response_model=PersonFacesOut, **reading)
    def person_faces(person: PersonParam, limit: Limit = None) -> PersonFacesOut:
        """A person's faces (a contact sheet): thumbnail, box, landmarks, quality."""
        with open_library() as lib:
            pid = people.person_id(lib, person)
            table = people.person_faces(lib, pid)
            shown = [int(i) for i in table.ids[:limit]]
            faces = [
                LibraryFaceOut(
                    **lib.face_details(i), thumbnail=base64.b64encode(lib.thumbnail(i)).decode()
                )
                for i in shown
            ]
            return PersonFacesOut(person=pid, total=len(table.ids), faces=faces)

    @app.get("/v1/people/{person}/photos", response_model=PhotosOut, **reading)
    def person_photos(person: PersonParam, limit: Limit = None) -> PhotosOut:
        """The photos a person is in, most typical face first, with the person's boxes."""
        with open_library() as lib:
            hits = search_person(lib, person, limit)
        return PhotosOut(photos=[PhotoOut(**asdict(h)) for h in hits])

    @app.get(
        "/v1/faces/{face}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **reading["responses"]},
        dependencies=reading["dependencies"],
    )
    def thumbnail(face: FaceParam) -> Response:
        """A face's thumbnail (JPEG: the box grown by 20%, 96 px)."""
        with open_library() as lib:
            return Response(lib.thumbnail(face), media_type="image/jpeg")

    @app.post("/v1/people/{person}/name", response_model=DoneOut, **writing)
    def name(person: PersonParam, body: NameIn) -> DoneOut:
        """Name (or rename) a person: it becomes an identity of the served gallery."""
        return change(lambda lib: people.name_person(lib, person, body.name), f"named {body.name}")

    @app.post("/v1/people/{person}/merge", response_model=DoneOut, **writing)
    def merge(person: PersonParam, body: MergeIn) -> DoneOut:
        """Move every face of `other` into this person; `other` is deleted."""
        return change(
            lambda lib: people.merge_people(lib, person, body.other),
            f"merged {body.other} into {person}",
        )

    @app.post("/v1/people/{person}/split", response_model=SplitOut, **writing)
    def split(person: PersonParam, body: SplitIn) -> SplitOut:
        """Move some of a person's faces out into a new unnamed person (pinned there); every
        face must be this person's (else 422 naming the others)."""
        new = apply(lambda lib: people.split_person(lib, body.faces, of=person))
        n = len(set(body.faces))
        done = f"split {n} face{'' if n == 1 else 's'} of {person} into person {new}"
        return SplitOut(done=done, person=new)

    @app.post("/v1/faces/{face}/move", response_model=DoneOut, **writing)
    def move(face: FaceParam, body: MoveIn) -> DoneOut:
        """Put a face into another person, or (person null) take it out of any person."""
        return change(
            lambda lib: people.move_face(lib, face, body.person),
            f"moved face {face} to {'nobody' if body.person is None else body.person}",
        )

    @app.post("/v1/faces/{face}/ignore", response_model=DoneOut, **writing)
    def ignore(face: FaceParam) -> DoneOut:
        """Mark a face "not a face / ignore": out of every person, cluster and search."""
        return change(lambda lib: people.ignore_face(lib, face), f"ignored face {face}")

    @app.post("/v1/people/undo", response_model=DoneOut, **writing)
    def undo() -> DoneOut:
        """Undo the library's last action (curation or clustering)."""
        return DoneOut(done=f"undone: {apply(people.undo)}")
