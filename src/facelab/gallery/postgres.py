"""A gallery in PostgreSQL: the same tables, schema version, model binding, thresholds and
revision counter as the SQLite file (`store.py`), for galleries several servers share.

`PostgresStore` is a `GalleryStore` whose connection speaks PostgreSQL: the SQL of store.py runs
unchanged through a small translating connection (placeholders, `INSERT OR IGNORE/REPLACE`),
so both backends share one implementation of every gallery operation. What differs is here:

- **Atomicity.** A change is one transaction that first locks the revision row
  (`SELECT ... FOR UPDATE`), so writers queue as on SQLite's `BEGIN IMMEDIATE`; the unique
  name constraint backs it up. Two replicas enrolling one name at once: the second waits, then
  sees the name and is refused with a GalleryError; nothing half-written is ever visible.
- **Following changes.** Triggers on `identities` and `images` write the names each revision
  touched to `changes(revision, name)`, and every committed change sends
  `NOTIFY facelab_gallery, '<revision>'`. A replica that missed notifications (restarted,
  disconnected) compares revisions and reads only the identities changed since its own
  (`changes_since`), not the whole gallery.
- **Pruning the change log.** Every writer keeps only the last `log_keep` revisions of it
  (meta `log_keep`, default `LOG_KEEP`; `prune_log` changes it) and records where it now starts
  (meta `log_start`): a replica behind that revision cannot patch and reads the whole gallery.
- **Lost connections.** Any connection error becomes `GalleryUnavailable` naming the gallery
  and saying whether the change was not stored or, if the connection dropped during COMMIT,
  whether it is unknown.

Reads run in REPEATABLE READ transactions, so a snapshot or a delta is one revision's state.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from facelab.gallery.store import (
    _SCHEMA,
    SCHEMA_VERSION,
    GalleryConflict,
    GalleryError,
    GalleryStore,
)

CHANNEL = "facelab_gallery"
# Revisions of change log every writer keeps (about 50 bytes per name a revision touched): a
# replica may be this many changes behind and still catch up by reading only those.
LOG_KEEP = 100_000

# store.py's schema in PostgreSQL's types, plus the change log and the triggers that fill it.
_POSTGRES_SCHEMA = (
    _SCHEMA.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
    .replace("BLOB", "BYTEA")
    .replace(" REAL", " DOUBLE PRECISION")
    + """;
CREATE TABLE changes (revision BIGINT NOT NULL, name TEXT NOT NULL, PRIMARY KEY (revision, name));
CREATE FUNCTION facelab_identity_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO changes VALUES (current_setting('facelab.revision')::bigint, NEW.name)
        ON CONFLICT DO NOTHING;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO changes VALUES (current_setting('facelab.revision')::bigint, OLD.name)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE FUNCTION facelab_image_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes
    SELECT current_setting('facelab.revision')::bigint, name FROM identities
    WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.identity_id ELSE NEW.identity_id END
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER identities_changed AFTER INSERT OR UPDATE OR DELETE ON identities
    FOR EACH ROW EXECUTE FUNCTION facelab_identity_changed();
CREATE TRIGGER images_changed AFTER INSERT OR UPDATE OR DELETE ON images
    FOR EACH ROW EXECUTE FUNCTION facelab_image_changed()
"""
)
# One schema creation at a time across processes (an arbitrary application lock number).
_SCHEMA_LOCK = 0x6661636C


def is_postgres_address(address: object) -> bool:
    return isinstance(address, str) and address.startswith(("postgresql://", "postgres://"))


def redact(address: str) -> str:
    """The address without its password, for messages and logs."""
    parts = urlsplit(address)
    if parts.password is None:
        return address
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


class GalleryUnavailable(GalleryError):
    """The gallery's database cannot be reached now; the message says what became of the change."""


class LogPruned(GalleryError):
    """The change log no longer reaches back to the asked revision: read the whole gallery."""


@dataclass(frozen=True)
class Delta:
    """The identities changed after some revision, as they are at `revision`: each changed
    name with its embeddings now (absent from `embeddings` when no longer enrolled)."""

    revision: int
    changed: list[str]
    embeddings: dict[str, np.ndarray]


class _Connection:
    """A psycopg connection accepting store.py's SQLite-flavoured SQL."""

    def __init__(self, conn: Any, path: str) -> None:
        self.raw = conn
        self.path = path
        self._upsert: dict[str, str] = {}

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        # Rows of queries in binary (embeddings as raw bytes, not hex text: a snapshot reads
        # faster); other statements as text, which also allows several in one string.
        binary = sql.lstrip().upper().startswith("SELECT")
        with self._errors():
            return self.raw.cursor(binary=binary).execute(self._translate(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._errors(), self.raw.cursor() as cursor:
            cursor.executemany(self._translate(sql), rows)

    @contextmanager
    def _errors(self, outcome: str = "nothing was changed") -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.errors.LockNotAvailable as exc:
            raise GalleryUnavailable(
                f"{self.path}: gallery busy (another writer held it past the lock timeout); "
                f"{outcome}"
            ) from exc
        except psycopg.errors.UniqueViolation as exc:  # the name constraint, behind the lock
            raise GalleryConflict(f"{self.path}: {exc.diag.message_detail or exc}") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GalleryUnavailable(
                f"{self.path}: lost the database connection ({reason}); {outcome}"
            ) from exc

    def _translate(self, sql: str) -> str:
        match = re.match(r"\s*INSERT OR (IGNORE|REPLACE) INTO (\w+)", sql)
        sql = sql.replace("?", "%s")
        if match is None:
            return sql
        sql = "INSERT INTO" + sql[match.end(1) + len(" INTO") :]
        if match.group(1) == "IGNORE":
            return sql + " ON CONFLICT DO NOTHING"
        return sql + self._replace_clause(match.group(2))

    def _replace_clause(self, table: str) -> str:
        """`ON CONFLICT (primary key) DO UPDATE` of every column: SQLite's INSERT OR REPLACE."""
        if table not in self._upsert:
            key = self.raw.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary",
                (table,),
            ).fetchall()
            columns = self.raw.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                "AND table_schema = current_schema() ORDER BY ordinal_position",
                (table,),
            ).fetchall()
            names = [c for (c,) in columns]
            self._upsert[table] = (
                f" ON CONFLICT ({', '.join(k for (k,) in key)}) DO UPDATE SET "
                f"({', '.join(names)}) = ROW({', '.join('EXCLUDED.' + n for n in names)})"
            )
        return self._upsert[table]

    def close(self) -> None:
        self.raw.close()


class PostgresStore(GalleryStore):
    """An open gallery in a PostgreSQL database (`postgresql://user@host:port/db`).

    `create=True` makes the gallery's tables when the database has none; the database itself
    must exist (operators create it, as they do for any application)."""

    def __init__(self, address: str, create: bool = False, timeout: float = 60.0) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise GalleryError(
                "PostgreSQL galleries need psycopg: pip install 'facelab[postgres]'"
            ) from exc
        self.path = redact(address)
        self.address = address
        self.read_only = False  # GalleryStore's flag for unwritable files; a database is not one
        try:
            raw = psycopg.connect(
                address,
                autocommit=True,
                connect_timeout=max(1, int(timeout)),
                application_name="facelab",
            )
        except psycopg.OperationalError as exc:
            raise GalleryUnavailable(f"{self.path}: cannot connect ({str(exc).strip()})") from exc
        except psycopg.ProgrammingError as exc:  # a malformed address
            raise GalleryError(f"{self.path}: not a PostgreSQL address ({exc})") from exc
        self._conn = _Connection(raw, self.path)
        self._create = create
        try:
            self._conn.execute(f"SET lock_timeout = '{int(timeout * 1000)}ms'")
            self._open_schema()
        except BaseException:
            self._conn.close()
            raise

    def _open_schema(self) -> None:
        if self._schema_version() is None:
            if not self._create:
                raise GalleryError(f"{self.path}: no gallery in this database (enroll someone)")
            self._conn.execute("BEGIN")
            try:
                self._conn.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
                if self._schema_version() is None:  # another process may have just made it
                    if self._conn.execute(
                        "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
                    ).fetchone()[0]:
                        raise GalleryError(
                            f"{self.path}: a database with tables, but not a facelab gallery"
                        )
                    self._conn.execute(_POSTGRES_SCHEMA)  # no parameters: many statements
                    self._conn.executemany(
                        "INSERT INTO meta VALUES (?, ?)",
                        [("schema_version", str(SCHEMA_VERSION)), ("revision", "0")],
                    )
            except BaseException:
                self._rollback()
                raise
            self._conn.execute("COMMIT")
        super()._open_schema()

    def _schema_version(self) -> int | None:
        if self._conn.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
            return None
        return super()._schema_version()

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One transaction, serialised with every other writer by the revision row's lock."""
        self._conn.execute("BEGIN")
        try:
            (revision,) = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'revision' FOR UPDATE"
            ).fetchone()
            self._conn.execute(
                "SELECT set_config('facelab.revision', ?, true)", (str(int(revision) + 1),)
            )
            yield self._conn
        except BaseException:
            self._rollback()
            raise
        with self._conn._errors("whether the change was stored is unknown (list the gallery)"):
            self._conn.raw.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[Any]:
        self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield self._conn
        finally:
            self._rollback()

    def _rollback(self) -> None:
        if not self._conn.raw.closed:
            try:
                self._conn.raw.execute("ROLLBACK")
            except Exception:  # the connection is gone: the server rolled back already
                self._conn.raw.close()

    def _bump(self, db: Any) -> None:
        (revision,) = db.execute(
            "UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'revision' "
            "RETURNING value"
        ).fetchone()
        self._prune(db, int(revision))
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL, revision))

    def _prune(self, db: Any, revision: int) -> None:
        """Drop the change log's revisions before the last `log_keep` ones and move `log_start`
        (inside the writer's transaction: usually one revision's rows, by primary key)."""
        db.execute(
            "WITH start AS (SELECT ?::bigint - COALESCE((SELECT value::bigint FROM meta "
            "WHERE key = 'log_keep'), ?) AS revision), "
            "gone AS (DELETE FROM changes WHERE revision <= (SELECT revision FROM start)) "
            "INSERT INTO meta SELECT 'log_start', revision::text FROM start WHERE revision > 0 "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value "
            "WHERE meta.value::bigint < EXCLUDED.value::bigint",
            (revision, LOG_KEEP),
        )

    def prune_log(self, keep: int) -> int:
        """Keep the last `keep` revisions of change log from now on (every writer prunes to
        it) and prune now; returns the revision the log starts at."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise GalleryError(f"{self.path}: revisions to keep must be an integer >= 0")
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('log_keep', ?)", (str(keep),))
            self._prune(db, self.revision())
        return self.log_start()

    def log_start(self) -> int:
        """The change log holds every change after this revision (0: never pruned)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'log_start'").fetchone()
        return 0 if row is None else int(row[0])

    def gallery_id(self) -> str:
        """A random identity made once per gallery database, so that a replica's saved index of
        one gallery is never taken for another's (a copy or a re-created database gets its own)."""
        query = "SELECT value FROM meta WHERE key = 'gallery_id'"
        row = self._conn.execute(query).fetchone()
        if row is None:  # a gallery made before galleries had one
            self._conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('gallery_id', ?)", (uuid.uuid4().hex,)
            )
            row = self._conn.execute(query).fetchone()
        return row[0]

    # -- following changes --------------------------------------------------------------------

    def changes_since(self, revision: int) -> Delta:
        """What changed after `revision`: the touched identities, as they are now. LogPruned
        when the log no longer reaches back that far."""
        with self._read() as db:
            now = self.revision()
            start = self.log_start()
            if revision < start:
                raise LogPruned(
                    f"{self.path}: the change log starts at revision {start} (pruned), after "
                    f"revision {revision}"
                )
            changed = [
                name
                for (name,) in db.execute(
                    "SELECT DISTINCT name FROM changes WHERE revision > ? ORDER BY name",
                    (revision,),
                ).fetchall()
            ]
            rows = db.execute(
                "SELECT identities.name, images.embedding FROM images JOIN identities "
                "ON images.identity_id = identities.id WHERE identities.name = ANY(?) "
                "ORDER BY identities.name, images.id",
                (changed,),
            ).fetchall()
        matrix = self._matrix([blob for _, blob in rows])
        names = [name for name, _ in rows]
        starts = [i for i in range(len(names)) if i == 0 or names[i] != names[i - 1]]
        ends = starts[1:] + [len(names)] if names else []
        embeddings = {names[a]: matrix[a:b] for a, b in zip(starts, ends, strict=True)}
        return Delta(now, changed, embeddings)

    def listen(self) -> None:
        """Subscribe this connection to change notifications (see `wait_for_change`)."""
        self._conn.execute(f"LISTEN {CHANNEL}")

    def wait_for_change(self, timeout: float) -> bool:
        """Block until a change is announced (True) or `timeout` seconds pass (False)."""
        with self._conn._errors():
            for _ in self._conn.raw.notifies(timeout=timeout, stop_after=1):
                return True
        return False

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["bytes"] = int(
            self._conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        )
        return out
