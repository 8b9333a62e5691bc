"""People of a library: cluster the unnamed faces, list, name, merge, split, move, ignore, undo.

Rules that make names survive re-indexing and re-clustering:

- a named person keeps every face assigned to it; `cluster` never takes a face away from one;
- a face placed by hand (move, split) is pinned: `cluster` leaves it where it is;
- every other face is free: `cluster` first gives a free face to the person (named, or holding
  faces placed by hand) whose fixed faces it matches best, if that score reaches the operating
  point (the 1:1 threshold) and the face's quality reaches `min_quality`; the remaining free
  faces are clustered afresh
  (`collections.cluster`), clusters of two or more faces become unnamed people, single faces
  and low-quality ones stay unassigned.

Each action is one transaction and writes an undo record (the previous state of every face and
person row it touched); `undo` restores the last one. After every change the library's
gallery is brought in line with the named people (one identity per name, its faces enrolled),
so `facelab identify --gallery lib.db` knows everyone named here.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from facelab.collections.cluster import ClusterConfig, cluster_embeddings
from facelab.collections.library import FaceTable, Library, LibraryError, LibraryNotFound
from facelab.gallery.search import build_index
from facelab.gallery.store import EnrolledFace, Threshold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Person:
    id: int
    name: str | None
    faces: int
    representative: int  # face id


@dataclass(frozen=True)
class ClusterReport:
    threshold: float
    threshold_source: str
    target_far: float | None  # the FAR the threshold was taken at (None: given by the caller)
    faces: int
    joined_named: int  # free faces given to a named (or hand-made) person
    clusters: int  # unnamed people made (two or more faces)
    clustered_faces: int
    unassigned: int  # single faces and low-quality ones
    seconds: float


# -- undo log ------------------------------------------------------------------------------------


def _face_state(db: sqlite3.Connection, face_ids: list[int]) -> list[list[Any]]:
    rows = []
    for start in range(0, len(face_ids), 900):
        chunk = face_ids[start : start + 900]
        rows += db.execute(
            "SELECT id, person_id, pinned, ignored FROM lib_faces WHERE id IN "
            f"({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
    return [list(r) for r in rows]


def _people_rows(db: sqlite3.Connection, person_ids: list[int]) -> list[list[Any]]:
    return [
        list(db.execute("SELECT id, name, created FROM lib_people WHERE id = ?", (p,)).fetchone())
        for p in person_ids
    ]


def _log(
    db: sqlite3.Connection,
    kind: str,
    summary: str,
    faces: list[list[Any]],
    deleted_people: list[list[Any]],
    created_people: list[int],
    renamed: list[list[Any]] | None = None,
) -> None:
    undo = {
        "faces": faces,
        "deleted": deleted_people,
        "created": created_people,
        "renamed": renamed or [],
    }
    db.execute(
        "INSERT INTO lib_actions (kind, summary, undo, created) VALUES (?, ?, ?, ?)",
        (kind, summary, json.dumps(undo), time.time()),
    )


def undo(library: Library) -> str:
    """Restore the state before the last action; returns that action's summary."""
    with library.write() as db:
        row = db.execute(
            "SELECT id, summary, undo FROM lib_actions ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise LibraryError(f"{library.path}: nothing to undo")
        action_id, summary, state = row[0], row[1], json.loads(row[2])
        db.executemany("DELETE FROM lib_people WHERE id = ?", [(p,) for p in state["created"]])
        db.executemany(
            "UPDATE lib_people SET name = ? WHERE id = ?",
            [(name, pid) for pid, name in state["renamed"]],
        )
        db.executemany(
            "INSERT INTO lib_people (id, name, created) VALUES (?, ?, ?)", state["deleted"]
        )
        # faces deleted since (their file re-indexed or gone) are simply not there to restore
        db.executemany(
            "UPDATE lib_faces SET person_id = ?, pinned = ?, ignored = ? WHERE id = ?",
            [(p, pin, ign, fid) for fid, p, pin, ign in state["faces"]],
        )
        db.execute("DELETE FROM lib_actions WHERE id = ?", (action_id,))
    sync_gallery(library)
    return summary


# -- looking people up ---------------------------------------------------------------------------


def person_id(library: Library, ref: str | int) -> int:
    """A person by id (an int or a string of digits) or by name."""
    if isinstance(ref, int) or str(ref).isdigit():
        rows = library.query("SELECT id FROM lib_people WHERE id = ?", (int(ref),))
    else:
        rows = library.query("SELECT id FROM lib_people WHERE name = ?", (ref,))
    row = rows[0] if rows else None
    if row is None:
        raise LibraryNotFound(f"{library.path}: no person {ref!r}")
    return int(row[0])


def _check_face(library: Library, face_id: int) -> None:
    if not library.query("SELECT 1 FROM lib_faces WHERE id = ?", (face_id,)):
        raise LibraryNotFound(f"{library.path}: no face {face_id}")


def representative(table: FaceTable, rows: np.ndarray) -> int:
    """The face id closest to the person's mean embedding among its better-quality half."""
    quality = table.quality[rows]
    good = rows[quality >= np.median(quality)]
    centre = table.embeddings[rows].mean(0)
    return int(table.ids[good[np.argmax(table.embeddings[good] @ centre)]])


def list_people(library: Library, min_faces: int = 1) -> list[Person]:
    """Every person with at least `min_faces` faces, named first, then by size."""
    table = library.faces("NOT f.ignored AND f.person_id IS NOT NULL")
    names = dict(library.query("SELECT id, name FROM lib_people"))
    # one sort groups every person's rows (ascending within a person), not one scan per person
    order = np.argsort(table.person, kind="stable")
    ids, starts, counts = np.unique(table.person[order], return_index=True, return_counts=True)
    people = []
    for pid, start, count in zip(ids, starts, counts, strict=True):
        if count >= min_faces:
            rows = order[start : start + count]
            people.append(
                Person(int(pid), names.get(int(pid)), int(count), representative(table, rows))
            )
    return sorted(people, key=lambda p: (p.name is None, -p.faces, p.name or "", p.id))


def person_faces(library: Library, ref: str | int) -> FaceTable:
    return library.faces("NOT f.ignored AND f.person_id = ?", (person_id(library, ref),))


# -- curation --------------------------------------------------------------------------------------


def name_person(library: Library, ref: str | int, name: str) -> None:
    """Give a person (a cluster) a name, or rename it; the name must be free."""
    name = name.strip()
    if not name or name.isdigit():
        raise LibraryError(f"{library.path}: a name must be non-empty and not only digits")
    pid = person_id(library, ref)
    with library.write() as db:
        taken = db.execute("SELECT id FROM lib_people WHERE name = ?", (name,)).fetchone()
        if taken and taken[0] != pid:
            raise LibraryError(
                f"{library.path}: {name!r} is already person {taken[0]}; merge them instead"
            )
        old = db.execute("SELECT name FROM lib_people WHERE id = ?", (pid,)).fetchone()[0]
        db.execute("UPDATE lib_people SET name = ? WHERE id = ?", (name, pid))
        _log(db, "name", f"name person {pid} {name!r} (was {old!r})", [], [], [], [[pid, old]])
    sync_gallery(library)


def merge_people(library: Library, keep: str | int, other: str | int) -> None:
    """Move every face of `other` into `keep` and delete `other` (its name goes unless `keep`
    has none, then `keep` takes it)."""
    a, b = person_id(library, keep), person_id(library, other)
    if a == b:
        raise LibraryError(f"{library.path}: cannot merge person {a} with itself")
    with library.write() as db:
        ids = [r[0] for r in db.execute("SELECT id FROM lib_faces WHERE person_id = ?", (b,))]
        faces = _face_state(db, ids)
        deleted = _people_rows(db, [b])
        name_a = db.execute("SELECT name FROM lib_people WHERE id = ?", (a,)).fetchone()[0]
        db.execute("UPDATE lib_faces SET person_id = ? WHERE person_id = ?", (a, b))
        db.execute("DELETE FROM lib_people WHERE id = ?", (b,))
        renamed = []
        if name_a is None and deleted[0][1] is not None:
            db.execute("UPDATE lib_people SET name = ? WHERE id = ?", (deleted[0][1], a))
            renamed = [[a, None]]
        _log(db, "merge", f"merge person {b} into {a}", faces, deleted, [], renamed)
    sync_gallery(library)


def split_person(library: Library, face_ids: list[int], of: str | int | None = None) -> int:
    """Move the given faces out into a new unnamed person (pinned there); returns its id.
    With `of`, every face must be that person's, checked in the split's own transaction (so a
    concurrent move cannot slip a face of someone else in)."""
    face_ids = list(dict.fromkeys(face_ids))
    if not face_ids:
        raise LibraryError(f"{library.path}: split needs at least one face")
    owner = None if of is None else person_id(library, of)
    for f in face_ids:
        _check_face(library, f)
    with library.write() as db:
        faces = _face_state(db, face_ids)
        if owner is not None:  # the person's faces as `person_faces` sees them: not ignored
            strays = sorted(f for f, p, _, ignored in faces if p != owner or ignored)
            if strays:
                raise LibraryError(f"{library.path}: faces {strays} are not person {owner}'s")
        (pid,) = db.execute(
            "INSERT INTO lib_people (name, created) VALUES (NULL, ?) RETURNING id", (time.time(),)
        ).fetchone()
        db.executemany(
            "UPDATE lib_faces SET person_id = ?, pinned = 1, ignored = 0 WHERE id = ?",
            [(pid, f) for f in face_ids],
        )
        _log(db, "split", f"split {len(face_ids)} faces into person {pid}", faces, [], [pid])
    sync_gallery(library)
    return int(pid)


def move_face(library: Library, face_id: int, to: str | int | None) -> None:
    """Put a face into a person (pinned there), or with `to=None` take it out of any person
    (pinned unassigned, so re-clustering does not put it back)."""
    _check_face(library, face_id)
    target = None if to is None else person_id(library, to)
    with library.write() as db:
        faces = _face_state(db, [face_id])
        db.execute(
            "UPDATE lib_faces SET person_id = ?, pinned = 1, ignored = 0 WHERE id = ?",
            (target, face_id),
        )
        _log(db, "move", f"move face {face_id} to {target}", faces, [], [])
    sync_gallery(library)


def ignore_face(library: Library, face_id: int) -> None:
    """Mark a face "not a face / ignore": out of every person, cluster and search."""
    _check_face(library, face_id)
    with library.write() as db:
        faces = _face_state(db, [face_id])
        db.execute("UPDATE lib_faces SET person_id = NULL, ignored = 1 WHERE id = ?", (face_id,))
        _log(db, "ignore", f"ignore face {face_id}", faces, [], [])
    sync_gallery(library)


# -- clustering ------------------------------------------------------------------------------------


def cluster_library(
    library: Library, threshold: Threshold, config: ClusterConfig | None = None
) -> ClusterReport:
    """Assign the free faces (module docstring) in one transaction."""
    tick = time.perf_counter()
    config = config or ClusterConfig(threshold=threshold.value)
    table = library.faces()
    names = dict(library.query("SELECT id, name FROM lib_people"))
    named = np.array([names.get(int(p)) is not None for p in table.person])
    free = ~(table.pinned | named)
    usable = table.quality >= config.min_quality
    person = np.where(free, -1, table.person)
    joined = 0
    fixed = ~free & (table.person >= 0)
    if fixed.any() and free.any():
        anchors = np.flatnonzero(fixed)
        scores, rows = build_index(table.embeddings[anchors]).search(table.embeddings[free], 1)
        hit = (scores[:, 0] >= threshold.value) & usable[free]
        target = table.person[anchors[rows[:, 0]]]
        person[np.flatnonzero(free)[hit]] = target[hit]
        joined = int(hit.sum())
    rest = np.flatnonzero(free & (person < 0))
    labels = cluster_embeddings(table.embeddings[rest], config, table.quality[rest])
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, int)
    grouped = (labels >= 0) & (sizes[np.maximum(labels, 0)] >= 2) if len(sizes) else labels >= 0
    with library.write() as db:
        changed = table.ids[free].tolist()
        faces = _face_state(db, changed)
        stale = [
            r[0]
            for r in db.execute(
                "SELECT id FROM lib_people p WHERE name IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM lib_faces f WHERE f.person_id = p.id AND f.pinned)"
            )
        ]
        deleted = _people_rows(db, stale)
        db.executemany("DELETE FROM lib_people WHERE id = ?", [(p,) for p in stale])
        created = []
        now = time.time()
        for label in np.unique(labels[grouped]):
            (pid,) = db.execute(
                "INSERT INTO lib_people (name, created) VALUES (NULL, ?) RETURNING id", (now,)
            ).fetchone()
            created.append(int(pid))
            person[rest[grouped & (labels == label)]] = pid
        db.executemany(
            "UPDATE lib_faces SET person_id = ? WHERE id = ?",
            [
                (int(p) if p >= 0 else None, int(f))
                for f, p in zip(table.ids[free], person[free], strict=True)
            ],
        )
        _log(db, "cluster", f"cluster {int(free.sum())} free faces", faces, deleted, created)
    sync_gallery(library)
    return ClusterReport(
        threshold=threshold.value,
        threshold_source=threshold.source,
        target_far=threshold.target_far,
        faces=len(table.ids),
        joined_named=joined,
        clusters=len(created),
        clustered_faces=int(grouped.sum()),
        unassigned=int((person[free] < 0).sum()),
        seconds=time.perf_counter() - tick,
    )


# -- the gallery of named people -------------------------------------------------------------------


def sync_gallery(library: Library) -> None:
    """Make the library's gallery hold exactly the named people and their faces. Idempotent:
    a run killed between the library's commit and this one is repaired by the next call."""
    model = library.model()
    if model is None:
        return
    rows = library.query(
        "SELECT p.name, l.path, l.sha256, f.face, f.embedding FROM lib_faces f "
        "JOIN lib_people p ON p.id = f.person_id JOIN lib_files l ON l.id = f.file_id "
        "WHERE p.name IS NOT NULL AND NOT f.ignored ORDER BY p.name, f.id"
    )
    wanted: dict[str, list[EnrolledFace]] = {}
    for name, path, sha, face, blob in rows:
        wanted.setdefault(name, []).append(
            EnrolledFace(path, sha, face, np.frombuffer(blob, "<f4"))
        )
    store = library.gallery
    have = {info.name for info in store.identities()}
    for name in sorted(have - set(wanted)):
        store.remove(name)
    for name, faces in wanted.items():
        current = store.images(name) if name in have else []
        if current != [(f.path, f.sha256, f.face) for f in faces]:
            if name in have:
                store.remove(name)
            store.add({name: faces}, model)
