"""The gallery file: one SQLite database holding enrolled identities, their images and embeddings.

Why SQLite: one file, no server, and transactions that survive a killed process. The file is
opened in WAL mode with a busy timeout, every change is a single `BEGIN IMMEDIATE ... COMMIT`
transaction, so

- a process killed mid-enrollment leaves the gallery exactly as it was before that enrollment
  (the uncommitted WAL frames are discarded on the next open), and
- several processes may enroll at once: writers queue on the database lock, nothing is lost.

Embeddings are only comparable within one model, so the gallery records the fingerprint
(architecture, weights and preprocessing) of the model it was built with and refuses any other.
Every committed change increments a revision counter, which search indexes use to know when to
rebuild. Decision thresholds are stored with the target false-accept rate they were calibrated
for and the FAR/FRR measured at them.

Layout (schema version 1):

    meta(key, value)             schema_version, revision, model (JSON of ModelInfo),
                                 model_source (optional: how to load the model again)
    identities(id, name, created)
    images(id, identity_id, path, sha256, face, embedding float32 blob, created)
    thresholds(target_far, value, measured_far, measured_frr, n_genuine, n_impostor, source,
               created)
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facelab.models.face_model import FaceModel

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MEMORY = ":memory:"
# The label a decision gets when nobody in the gallery is close enough; never an identity name.
UNKNOWN = "unknown"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE identities (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    face INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX images_identity ON images(identity_id);
CREATE TABLE thresholds (
    target_far REAL PRIMARY KEY,
    value REAL NOT NULL,
    measured_far REAL NOT NULL,
    measured_frr REAL NOT NULL,
    n_genuine INTEGER NOT NULL,
    n_impostor INTEGER NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL
);
"""


@contextmanager
def write_transaction(
    conn: sqlite3.Connection, name: str = "gallery"
) -> Iterator[sqlite3.Connection]:
    """One write transaction: all of it is committed, or (on any error or a kill) none. A write
    lock another process holds past the busy timeout is GalleryBusy, naming `name`."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        raise GalleryBusy(
            f"{name}: gallery busy: another process is writing to it ({exc})"
        ) from exc
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class GalleryError(ValueError):
    """A gallery operation was refused; the message names the gallery file or the identity."""


class GalleryConflict(GalleryError):
    """Refused because the name is already enrolled (by this or another process)."""


class GalleryBusy(GalleryError):
    """Another process held the gallery's write lock for longer than the busy timeout."""


def identity_name(raw: str) -> str:
    """The one rule for identity names (enroll, rename): the name NFC-normalised, so that the
    composed and decomposed spellings of one name are one identity; refused when empty, with
    leading or trailing whitespace (`Ada ` is not silently `Ada`), with control characters or
    line breaks (they break line-based listings), or the reserved decision label `unknown`."""
    name = unicodedata.normalize("NFC", raw) if isinstance(raw, str) else ""
    bad = [ch for ch in name if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")]
    if not name:
        problem = "empty"
    elif name != name.strip():
        problem = "leading or trailing whitespace"
    elif bad:
        problem = f"control character {bad[0]!r}"
    elif name.casefold() == UNKNOWN:
        problem = f"{UNKNOWN!r} is the label of an unrecognised face"
    else:
        return name
    raise GalleryError(f"{raw!r} cannot be an identity name ({problem})")


@dataclass(frozen=True)
class ModelInfo:
    """What a gallery records of the model its embeddings were made with."""

    name: str
    fingerprint: str
    embedding_dim: int
    preprocess: dict[str, Any]

    @classmethod
    def of(cls, model: FaceModel) -> ModelInfo:
        preprocess = json.loads(json.dumps(model.preprocess.to_dict()))  # as stored: lists
        return cls(model.name, model.fingerprint(), model.embedding_dim, preprocess)

    def describe(self) -> str:
        return f"{self.name} (fingerprint {self.fingerprint}, {self.embedding_dim}-d)"


@dataclass(frozen=True)
class Threshold:
    """A decision threshold on cosine similarity and where it came from.

    `target_far` is the false-accept rate it was calibrated for (None when given by the caller);
    `measured_far`/`measured_frr` are the rates on the calibration trials at this threshold.
    """

    value: float
    source: str
    target_far: float | None = None
    measured_far: float | None = None
    measured_frr: float | None = None
    n_genuine: int = 0
    n_impostor: int = 0

    def describe(self) -> str:
        if self.target_far is None:
            return f"threshold {self.value:.4f} ({self.source})"
        if self.measured_far is None or self.measured_frr is None:  # e.g. interpolated
            return f"threshold {self.value:.4f} for target FAR {self.target_far:g} ({self.source})"
        return (
            f"threshold {self.value:.4f} for target FAR {self.target_far:g} (measured FAR "
            f"{self.measured_far:.4g}, FRR {self.measured_frr:.4g}; {self.source})"
        )


@dataclass(frozen=True)
class EnrolledFace:
    """One face to store: its image file (path + content hash), face number, and embedding."""

    path: str
    sha256: str
    face: int
    embedding: np.ndarray


@dataclass(frozen=True)
class IdentityInfo:
    name: str
    images: int
    created: float


@dataclass(frozen=True)
class Snapshot:
    """Every stored embedding at one revision, grouped by identity (labels index `names`)."""

    revision: int
    names: list[str]
    labels: np.ndarray
    embeddings: np.ndarray


def calibrated_for(stored: Sequence[Threshold], target_far: float | None) -> Threshold | None:
    """The one of `stored` (most recent first) calibrated for `target_far`, or without it the
    most recent; None if there is none."""
    if target_far is None:
        return stored[0] if stored else None
    for t in stored:
        if t.target_far is not None and np.isclose(t.target_far, target_far, rtol=1e-6):
            return t
    return None


def _writable(path: Path) -> bool:
    """Whether SQLite may write the gallery: the file and its folder (for -wal and -shm)."""
    return all(os.access(p, os.W_OK, effective_ids=True) for p in (path, path.parent))


def _read_only_uri(path: Path) -> str:
    """An SQLite URI opening `path` read-only. Where its folder cannot be written and it has
    no write-ahead log, nobody can be writing it, and SQLite (which could not make the -shm
    file a WAL reader needs) is told the file is immutable."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    wal = path.with_name(path.name + "-wal")
    if not os.access(path.parent, os.W_OK, effective_ids=True) and not wal.exists():
        uri += "&immutable=1"
    return uri


class GalleryStore:
    """An open gallery file. `create=True` makes a new empty gallery when the file is absent;
    `":memory:"` gives a throw-away gallery (used by the mapping task and evaluations).

    An existing file is first looked at read-only: anything but a facelab gallery (or an SQLite
    file without tables) is refused unchanged. A gallery that cannot be written (`read_only`)
    stays readable: it is opened read-only, without switching it to WAL."""

    def __init__(self, path: str | Path, create: bool = False, timeout: float = 60.0) -> None:
        self.path = str(path)
        self.read_only = False
        target = self.path
        if self.path != MEMORY:
            file = Path(self.path)
            if file.is_file():
                self.read_only = not _writable(file)
                self._refuse_foreign(timeout)
            elif not create:
                raise GalleryError(f"{self.path}: no gallery file (enroll someone to create it)")
            else:
                file.parent.mkdir(parents=True, exist_ok=True)
            if self.read_only:
                target = _read_only_uri(file)
        try:
            self._conn = sqlite3.connect(
                target, timeout=timeout, isolation_level=None, uri=self.read_only
            )
        except sqlite3.Error as exc:
            raise GalleryError(f"{self.path}: cannot open gallery ({exc})") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._open_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise GalleryError(f"{self.path}: not a readable facelab gallery ({exc})") from exc
        except GalleryError:
            self._conn.close()
            raise

    def _refuse_foreign(self, timeout: float) -> None:
        """Read the schema of an existing file read-only, before anything may change it."""
        uri = _read_only_uri(Path(self.path))
        try:
            with closing(sqlite3.connect(uri, uri=True, timeout=timeout)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
                ours = (
                    "meta" in tables
                    and db.execute("SELECT 1 FROM meta WHERE key = 'schema_version'").fetchone()
                )
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{self.path}: not a readable facelab gallery ({exc})") from exc
        if tables and not ours:
            raise GalleryError(
                f"{self.path}: an SQLite file, but not a facelab gallery (left unchanged)"
            )

    def _open_schema(self) -> None:
        version = self._schema_version()
        if version is None and self.read_only:
            raise GalleryError(f"{self.path}: an empty gallery file that is read-only")
        if version is None:
            if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._conn.execute("PRAGMA journal_mode = WAL")
            with self._write() as db:
                if self._schema_version() is None:  # another process may have just made it
                    if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                        raise GalleryError(
                            f"{self.path}: an SQLite file, but not a facelab gallery"
                        )
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.executemany(
                        "INSERT INTO meta VALUES (?, ?)",
                        [("schema_version", str(SCHEMA_VERSION)), ("revision", "0")],
                    )
            version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise GalleryError(
                f"{self.path}: gallery schema version {version} is newer than this facelab "
                f"supports ({SCHEMA_VERSION}); upgrade facelab to read it"
            )
        if version < SCHEMA_VERSION:
            raise GalleryError(
                f"{self.path}: gallery schema version {version} is older than this facelab's "
                f"({SCHEMA_VERSION}) and no migration exists; re-enroll with this version"
            )

    def _schema_version(self) -> int | None:
        try:
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        if row is None:
            raise GalleryError(f"{self.path}: gallery has no schema version")
        return int(row[0])

    # -- transactions -------------------------------------------------------------------------

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction (`write_transaction`), refused at once on a read-only gallery."""
        self.check_writable()
        return write_transaction(self._conn, str(self.path))

    @property
    def connection(self) -> sqlite3.Connection:
        """The open connection, for tables layered on the same file (a photo library's)."""
        return self._conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same committed revision."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    def check_writable(self) -> None:
        """Refuse, before any work, a change to a gallery opened read-only."""
        if self.read_only:
            raise GalleryError(f"{self.path}: the gallery file is read-only; nothing changed")

    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")

    # -- model binding ------------------------------------------------------------------------

    def model(self) -> ModelInfo | None:
        """The model the gallery was built with; None while nothing has been stored."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        return None if row is None else ModelInfo(**json.loads(row[0]))

    def model_source(self) -> str | None:
        """How to load the gallery's model again (a pretrained name or a checkpoint path), if
        recorded: lets tools embed new images without being told which model to use."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'model_source'").fetchone()
        return None if row is None else row[0]

    def set_model_source(self, source: str) -> None:
        """Record where the gallery's model comes from, unless already recorded."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('model_source', ?)", (source,))

    def check_model(self, model: ModelInfo) -> None:
        """Refuse a model other than the gallery's: their embeddings are not comparable."""
        stored = self.model()
        if stored is not None and stored.fingerprint != model.fingerprint:
            raise GalleryError(
                f"{self.path}: gallery was built with {stored.describe()}, not "
                f"{model.describe()}; use the gallery's model or a new gallery file"
            )

    def _bind(self, db: sqlite3.Connection, model: ModelInfo) -> None:
        self.check_model(model)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('model', ?)", (json.dumps(asdict(model)),))

    # -- identities ---------------------------------------------------------------------------

    def add(
        self,
        faces_by_name: Mapping[str, Sequence[EnrolledFace]],
        model: ModelInfo,
        append: bool = False,
    ) -> None:
        """Store the faces of each identity in one transaction.

        A name already enrolled is refused (nothing is stored) unless `append`, which adds the
        new faces to it.
        """
        now = time.time()
        with self._write() as db:
            self._bind(db, model)
            for name, faces in faces_by_name.items():
                row = db.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
                if row is not None and not append:
                    raise GalleryConflict(
                        f"{self.path}: {name!r} is already enrolled; append to add images to it"
                    )
                if row is None:
                    row = db.execute(
                        "INSERT INTO identities (name, created) VALUES (?, ?) RETURNING id",
                        (name, now),
                    ).fetchone()
                db.executemany(
                    "INSERT INTO images (identity_id, path, sha256, face, embedding, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (row[0], f.path, f.sha256, f.face, _to_blob(f.embedding, model), now)
                        for f in faces
                    ],
                )
            self._bump(db)

    def remove(self, name: str) -> int:
        """Delete an identity and all its images; returns how many images went."""
        with self._write() as db:
            count = self._image_count(db, name)
            db.execute("DELETE FROM identities WHERE name = ?", (name,))
            self._bump(db)
        return count

    def rename(self, old: str, new: str) -> None:
        new = identity_name(new)
        with self._write() as db:
            self._image_count(db, old)
            if db.execute("SELECT 1 FROM identities WHERE name = ?", (new,)).fetchone():
                raise GalleryError(f"{self.path}: cannot rename {old!r}: {new!r} already exists")
            db.execute("UPDATE identities SET name = ? WHERE name = ?", (new, old))
            self._bump(db)

    def _image_count(self, db: sqlite3.Connection, name: str) -> int:
        row = db.execute(
            "SELECT count(images.id) FROM identities LEFT JOIN images "
            "ON images.identity_id = identities.id WHERE identities.name = ? "
            "GROUP BY identities.id",
            (name,),
        ).fetchone()
        if row is None:
            raise GalleryError(f"{self.path}: {name!r} is not enrolled")
        return int(row[0])

    def contains(self, name: str) -> bool:
        """Whether `name` is enrolled: one indexed lookup, not a listing of the gallery."""
        row = self._conn.execute("SELECT 1 FROM identities WHERE name = ?", (name,)).fetchone()
        return row is not None

    def is_empty(self) -> bool:
        """Whether no embedding is stored (nothing to search)."""
        return self._conn.execute("SELECT 1 FROM images LIMIT 1").fetchone() is None

    def identities(self) -> list[IdentityInfo]:
        rows = self._conn.execute(
            "SELECT identities.name, count(images.id), identities.created FROM identities "
            "LEFT JOIN images ON images.identity_id = identities.id "
            "GROUP BY identities.id ORDER BY identities.name"
        ).fetchall()
        return [IdentityInfo(name, int(n), created) for name, n, created in rows]

    def images(self, name: str) -> list[tuple[str, str, int]]:
        """(path, sha256, face number) of each image enrolled for `name`."""
        with self._read() as db:
            self._image_count(db, name)
            return db.execute(
                "SELECT path, sha256, face FROM images JOIN identities "
                "ON images.identity_id = identities.id WHERE identities.name = ? "
                "ORDER BY images.id",
                (name,),
            ).fetchall()

    def embeddings(self, name: str) -> np.ndarray:
        """(n, D) embeddings of one identity; refuses a name that is not enrolled."""
        with self._read() as db:
            self._image_count(db, name)
            rows = db.execute(
                "SELECT embedding FROM images JOIN identities "
                "ON images.identity_id = identities.id WHERE identities.name = ? "
                "ORDER BY images.id",
                (name,),
            ).fetchall()
        return self._matrix([r[0] for r in rows])

    def revision(self) -> int:
        """Counter incremented by every committed change (search indexes key on it)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        return int(row[0])

    def snapshot(self) -> Snapshot:
        """All embeddings, grouped by identity name, read consistently at one revision."""
        with self._read() as db:
            revision = self.revision()
            rows = db.execute(
                "SELECT identities.name, images.embedding FROM images JOIN identities "
                "ON images.identity_id = identities.id ORDER BY identities.name, images.id"
            ).fetchall()
        names = sorted({name for name, _ in rows})
        index = {name: i for i, name in enumerate(names)}
        labels = np.fromiter((index[name] for name, _ in rows), dtype=np.int64, count=len(rows))
        return Snapshot(revision, names, labels, self._matrix([blob for _, blob in rows]))

    def _matrix(self, blobs: list[bytes]) -> np.ndarray:
        info = self.model()
        dim = info.embedding_dim if info is not None else 0
        return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).copy()

    # -- thresholds ---------------------------------------------------------------------------

    def set_threshold(self, threshold: Threshold, model: ModelInfo) -> None:
        """Store a calibrated threshold (replacing any earlier one for the same target FAR)."""
        if threshold.target_far is None:
            raise GalleryError(
                f"{self.path}: only calibrated thresholds (with a target FAR) are stored"
            )
        with self._write() as db:
            self._bind(db, model)
            db.execute(
                "INSERT OR REPLACE INTO thresholds VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    threshold.target_far,
                    threshold.value,
                    threshold.measured_far,
                    threshold.measured_frr,
                    threshold.n_genuine,
                    threshold.n_impostor,
                    threshold.source,
                    time.time(),
                ),
            )
            self._bump(db)

    def thresholds(self) -> list[Threshold]:
        """Stored thresholds, most recently calibrated first (the first is the default)."""
        rows = self._conn.execute(
            "SELECT value, source, target_far, measured_far, measured_frr, n_genuine, n_impostor "
            "FROM thresholds ORDER BY created DESC"
        ).fetchall()
        return [Threshold(*row) for row in rows]

    def threshold(self, target_far: float | None = None) -> Threshold:
        """The threshold for `target_far`, or the most recently calibrated one."""
        stored = self.thresholds()
        if not stored:
            raise GalleryError(
                f"{self.path}: no calibrated threshold; run `facelab calibrate` on a labelled "
                f"trial list, or give a threshold explicitly"
            )
        found = calibrated_for(stored, target_far)
        if found is not None:
            return found
        known = ", ".join(f"{t.target_far:g}" for t in stored)
        raise GalleryError(
            f"{self.path}: no threshold calibrated for FAR {target_far:g} (calibrated: {known})"
        )

    # -- summary ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._read() as db:
            n_ids, n_images = db.execute(
                "SELECT (SELECT count(*) FROM identities), (SELECT count(*) FROM images)"
            ).fetchone()
            model = self.model()
            out = {
                "gallery": self.path,
                "schema_version": SCHEMA_VERSION,
                "revision": self.revision(),
                "identities": int(n_ids),
                "images": int(n_images),
                "model": asdict(model) if model is not None else None,
                "model_source": self.model_source(),
                "thresholds": [asdict(t) for t in self.thresholds()],
            }
        if self.path != MEMORY:
            out["bytes"] = sum(
                p.stat().st_size for p in Path(self.path).parent.glob(Path(self.path).name + "*")
            )
        return out

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _to_blob(embedding: np.ndarray, model: ModelInfo) -> bytes:
    vec = np.asarray(embedding, dtype="<f4")
    if vec.shape != (model.embedding_dim,):
        raise GalleryError(f"embedding of shape {vec.shape} does not fit {model.describe()}")
    return vec.tobytes()
