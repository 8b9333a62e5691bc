"""The library file: every face of every indexed photo, its people, and the undo log.

One SQLite file is both a facelab gallery (`GalleryStore`: the named people, enrolled, so
`facelab identify --gallery lib.db` works on it) and the library's own tables, all prefixed
`lib_`, so the gallery knows nothing of them. Every change is one `BEGIN IMMEDIATE ... COMMIT`
transaction in WAL mode: a process killed at any point leaves the last committed state, and the
indexer commits once per batch of photos.

Layout (library schema version 2; the gallery keeps its own):

    lib_meta(key, value)      schema_version, model (JSON of ModelInfo), model_source
    lib_files(id, path, sha256, size, mtime_ns, faces, indexed)
    lib_faces(id, file_id, face, x1, y1, x2, y2, landmarks blob (5x2 float32), det_score,
              source, quality, quality_parts JSON, embedding blob (float32), thumbnail JPEG,
              person_id, pinned, ignored)
    lib_people(id, name NULL while an unnamed cluster, created)
    lib_actions(id, kind, summary, undo JSON, created)

`source` is the pipeline's route that found the face (`facelab.pipeline.ROUTES`: detected,
upsampled, padded, whole_frame, aligned, centre_crop, centre_fallback); the detector is the
model's preprocessing detector, recorded in `model`. Version 1 stored the detector's name
(e.g. "mtcnn") or "centre-crop" there; opening a version 1 file migrates it in place (one
transaction): a detector's name becomes `detected` (version 1 had no retries) and
"centre-crop" `centre_fallback` (`centre_crop` for a model aligned by a centre crop), and its
photos without a face are marked changed, so the next index run gives them the retries.

A person row is a cluster; it has a name once the user gives it one. `pinned` marks a face the
user placed by hand (re-clustering leaves it where it is); `ignored` one marked "not a face /
ignore" (never clustered, never searched).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facelab.gallery.store import GalleryError, GalleryStore, ModelInfo, write_transaction
from facelab.models.preprocess import DEFAULT_DETECTOR, LANDMARK_ALIGNMENTS
from facelab.pipeline import CENTRE_CROP, CENTRE_FALLBACK, DETECTED

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
V1_CENTRE = "centre-crop"  # version 1's source of a face assumed to fill the centre crop

_SCHEMA = """
CREATE TABLE lib_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE lib_files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    faces INTEGER NOT NULL,
    indexed REAL NOT NULL
);
CREATE TABLE lib_people (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE lib_faces (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES lib_files(id) ON DELETE CASCADE,
    face INTEGER NOT NULL,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    landmarks BLOB NOT NULL,
    det_score REAL NOT NULL,
    source TEXT NOT NULL,
    quality REAL NOT NULL,
    quality_parts TEXT NOT NULL,
    embedding BLOB NOT NULL,
    thumbnail BLOB NOT NULL,
    person_id INTEGER REFERENCES lib_people(id) ON DELETE SET NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    ignored INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX lib_faces_file ON lib_faces(file_id);
CREATE INDEX lib_faces_person ON lib_faces(person_id);
CREATE TABLE lib_actions (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    summary TEXT NOT NULL,
    undo TEXT NOT NULL,
    created REAL NOT NULL
);
"""


class LibraryError(GalleryError):
    """A library operation was refused; the message names the library file and what."""


class LibraryNotFound(LibraryError):
    """No such person or face in the library (the server answers 404, not 422)."""


@dataclass(frozen=True)
class IndexedFace:
    """One face found in a photo, ready to store."""

    face: int  # 0 = the photo's main face (`face_order`), 1 = the next, ...
    box: tuple[float, float, float, float]
    landmarks: np.ndarray  # (5, 2) image pixels
    det_score: float
    source: str  # the pipeline's route that found it (facelab.pipeline.ROUTES)
    quality: dict[str, float]  # `Quality.as_dict()`
    embedding: np.ndarray
    thumbnail: bytes  # JPEG


@dataclass(frozen=True)
class FileState:
    sha256: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class IndexedFile:
    path: str
    state: FileState
    faces: Sequence[IndexedFace]


@dataclass(frozen=True)
class FaceTable:
    """Columns of the selected faces, row i for face `ids[i]`."""

    ids: np.ndarray
    file_paths: list[str]
    faces: np.ndarray
    boxes: np.ndarray  # (n, 4)
    quality: np.ndarray
    person: np.ndarray  # person id, -1 for none
    pinned: np.ndarray
    embeddings: np.ndarray  # (n, D) float32


def _detector_of(model: ModelInfo) -> str:
    """The face detector named by a model's recorded preprocessing (older records: MTCNN)."""
    return model.preprocess.get("detector", DEFAULT_DETECTOR)


class Library:
    """An open library file (`create=True` makes it when absent)."""

    def __init__(self, path: str | Path, create: bool = False, timeout: float = 60.0) -> None:
        self.path = str(path)
        self._create = create
        try:
            self.gallery = GalleryStore(self.path, create=create, timeout=timeout)
        except GalleryError as exc:
            raise LibraryError(str(exc).replace("gallery file", "library file")) from exc
        self._conn = self.gallery.connection
        try:
            self._open_schema()
        except (sqlite3.DatabaseError, LibraryError):
            self.close()
            raise

    def _open_schema(self) -> None:
        """Readers take no write lock; a gallery without the library's tables gets them only
        with `create` (opening is never what turns a plain gallery into a library)."""
        if not self._has_schema(self._conn):
            if not self._create:
                raise LibraryError(
                    f"{self.path}: a gallery, not a library (index photos into it first: "
                    "facelab index PHOTOS --library FILE)"
                )
            with self.write() as db:
                if not self._has_schema(db):
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(
                        "INSERT INTO lib_meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
                    )
        if int(self.meta("schema_version") or 0) == 1:
            with self.write() as db:
                if int(self.meta("schema_version") or 0) == 1:
                    self._migrate_from_1(db)
        version = int(self.meta("schema_version") or 0)
        if version != SCHEMA_VERSION:
            raise LibraryError(
                f"{self.path}: library schema version {version}, this facelab reads "
                f"{SCHEMA_VERSION}; use a matching facelab or index into a new library file"
            )

    @staticmethod
    def _has_schema(db: sqlite3.Connection) -> bool:
        return (
            db.execute("SELECT 1 FROM sqlite_master WHERE name = 'lib_meta'").fetchone() is not None
        )

    def _migrate_from_1(self, db: sqlite3.Connection) -> None:
        """Version 1 -> 2: `source` names the pipeline's route (module docstring)."""
        model = self.model()
        centre = CENTRE_FALLBACK
        if model is not None and model.preprocess.get("alignment") not in LANDMARK_ALIGNMENTS:
            centre = CENTRE_CROP
        db.execute(
            "UPDATE lib_faces SET source = CASE source WHEN ? THEN ? ELSE ? END",
            (V1_CENTRE, centre, DETECTED),
        )
        # photos version 1 found no face in get the retries: the next run reads them again
        db.execute("UPDATE lib_files SET sha256 = '', mtime_ns = -1 WHERE faces = 0")
        db.execute("UPDATE lib_meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        log.info("%s: library schema 1 migrated to %d", self.path, SCHEMA_VERSION)

    # -- transactions ---------------------------------------------------------------------------

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction: all of it is committed, or (on any error or a kill) none."""
        return write_transaction(self._conn)

    def close(self) -> None:
        self.gallery.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows of a read-only query on the library's tables (outside any write)."""
        return self._conn.execute(sql, tuple(params)).fetchall()

    # -- meta and model -------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM lib_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def model(self) -> ModelInfo | None:
        value = self.meta("model")
        return None if value is None else ModelInfo(**json.loads(value))

    def detector(self) -> str | None:
        """The face detector the library's faces were found with (its model's preprocessing),
        None before anything was indexed."""
        model = self.model()
        return None if model is None else _detector_of(model)

    def bind_model(self, model: ModelInfo, source: str | None) -> None:
        """Refuse a model or detector other than the library's (its faces would not compare);
        record it (and how to load it) if new."""
        stored = self.model()
        if stored is not None and stored.fingerprint != model.fingerprint:
            built, asked = _detector_of(stored), _detector_of(model)
            if built != asked and stored.name == model.name:
                raise LibraryError(
                    f"{self.path}: library was built with the {built} detector, not {asked}; "
                    f"index with --detector {built} (or without --detector), or into a new "
                    f"library file"
                )
            raise LibraryError(
                f"{self.path}: library was indexed with {stored.describe()}, not "
                f"{model.describe()}; use the library's model or a new library file"
            )
        with self.write() as db:
            db.execute(
                "INSERT OR IGNORE INTO lib_meta VALUES ('model', ?)", (json.dumps(asdict(model)),)
            )
            if source is not None:
                db.execute("INSERT OR IGNORE INTO lib_meta VALUES ('model_source', ?)", (source,))
        if source is not None:
            self.gallery.set_model_source(
                source
            )  # so `facelab calibrate --gallery` needs no --model

    def _dim(self) -> int:
        model = self.model()
        if model is None:
            raise LibraryError(f"{self.path}: library is empty (index some photos first)")
        return model.embedding_dim

    # -- files ----------------------------------------------------------------------------------

    def file_states(self) -> dict[str, FileState]:
        rows = self._conn.execute("SELECT path, sha256, size, mtime_ns FROM lib_files").fetchall()
        return {path: FileState(sha, size, mtime) for path, sha, size, mtime in rows}

    def store_files(self, files: Sequence[IndexedFile]) -> None:
        """Replace each file's row and faces, all files in one transaction."""
        now = time.time()
        with self.write() as db:
            for f in files:
                db.execute("DELETE FROM lib_files WHERE path = ?", (f.path,))
                (file_id,) = db.execute(
                    "INSERT INTO lib_files (path, sha256, size, mtime_ns, faces, indexed) "
                    "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    (f.path, f.state.sha256, f.state.size, f.state.mtime_ns, len(f.faces), now),
                ).fetchone()
                db.executemany(
                    "INSERT INTO lib_faces (file_id, face, x1, y1, x2, y2, landmarks, det_score,"
                    " source, quality, quality_parts, embedding, thumbnail) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            file_id,
                            face.face,
                            *face.box,
                            np.asarray(face.landmarks, "<f4").tobytes(),
                            face.det_score,
                            face.source,
                            face.quality["score"],
                            json.dumps(face.quality),
                            np.asarray(face.embedding, "<f4").tobytes(),
                            face.thumbnail,
                        )
                        for face in f.faces
                    ],
                )

    def touch_files(self, states: dict[str, FileState]) -> None:
        """Record new size/mtime for files whose content (hash) did not change."""
        with self.write() as db:
            db.executemany(
                "UPDATE lib_files SET size = ?, mtime_ns = ? WHERE path = ?",
                [(s.size, s.mtime_ns, path) for path, s in states.items()],
            )

    def remove_files(self, paths: Sequence[str]) -> None:
        """Drop files (and, by cascade, their faces), in one transaction."""
        with self.write() as db:
            db.executemany("DELETE FROM lib_files WHERE path = ?", [(p,) for p in paths])

    # -- faces ----------------------------------------------------------------------------------

    def faces(self, where: str = "NOT f.ignored", params: Sequence[Any] = ()) -> FaceTable:
        """The faces matching an SQL condition on `f` (lib_faces) and `lib_files` columns."""
        rows = self._conn.execute(
            "SELECT f.id, lib_files.path, f.face, f.x1, f.y1, f.x2, f.y2, f.quality, "
            "coalesce(f.person_id, -1), f.pinned, f.embedding FROM lib_faces f "
            f"JOIN lib_files ON lib_files.id = f.file_id WHERE {where} ORDER BY f.id",
            tuple(params),
        ).fetchall()
        dim = self._dim() if rows else 0
        emb = np.frombuffer(b"".join(r[10] for r in rows), "<f4").reshape(len(rows), dim)
        return FaceTable(
            ids=np.array([r[0] for r in rows], np.int64),
            file_paths=[r[1] for r in rows],
            faces=np.array([r[2] for r in rows], np.int64),
            boxes=np.array([r[3:7] for r in rows], np.float64).reshape(-1, 4),
            quality=np.array([r[7] for r in rows], np.float64),
            person=np.array([r[8] for r in rows], np.int64),
            pinned=np.array([r[9] for r in rows], bool),
            embeddings=emb.astype(np.float32),
        )

    def thumbnail(self, face_id: int) -> bytes:
        row = self._conn.execute(
            "SELECT thumbnail FROM lib_faces WHERE id = ?", (face_id,)
        ).fetchone()
        if row is None:
            raise LibraryNotFound(f"{self.path}: no face {face_id}")
        return row[0]

    def face_details(self, face_id: int) -> dict[str, Any]:
        row = self._conn.execute(
            "SELECT lib_files.path, f.face, f.x1, f.y1, f.x2, f.y2, f.landmarks, f.det_score, "
            "f.source, f.quality_parts, f.person_id, f.pinned, f.ignored FROM lib_faces f "
            "JOIN lib_files ON lib_files.id = f.file_id WHERE f.id = ?",
            (face_id,),
        ).fetchone()
        if row is None:
            raise LibraryNotFound(f"{self.path}: no face {face_id}")
        return {
            "id": face_id,
            "path": row[0],
            "face": row[1],
            "box": list(row[2:6]),
            "landmarks": np.frombuffer(row[6], "<f4").reshape(5, 2).tolist(),
            "det_score": row[7],
            "source": row[8],
            "quality": json.loads(row[9]),
            "person_id": row[10],
            "pinned": bool(row[11]),
            "ignored": bool(row[12]),
        }

    def stats(self) -> dict[str, int]:
        one = self._conn.execute
        return {
            "files": one("SELECT count(*) FROM lib_files").fetchone()[0],
            "faces": one("SELECT count(*) FROM lib_faces").fetchone()[0],
            "people_named": one(
                "SELECT count(*) FROM lib_people WHERE name IS NOT NULL"
            ).fetchone()[0],
            "clusters": one("SELECT count(*) FROM lib_people WHERE name IS NULL").fetchone()[0],
            "ignored": one("SELECT count(*) FROM lib_faces WHERE ignored").fetchone()[0],
        }
