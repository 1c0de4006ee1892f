"""A pool's durable state in SQLite (WAL): waiting and running jobs, the spend ledger, dead letters.

Every change is one short transaction, committed before the call returns, so a
crash of otree (even ``kill -9``) loses nothing that a caller was told about.
WAL with ``synchronous=NORMAL`` survives a crash of the process; only a crash of
the machine can lose the last transactions. The file is created 0600.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from ._errors import OtreeError
from ._paths import ensure_private_dir

__all__ = ["INTERRUPTIONS_TO_DEAD", "Store", "StoreError", "StoredJob"]

INTERRUPTIONS_TO_DEAD = 3  # a job interrupted this often is probably what kills otree

# columns added since the first schema: (table, column, declaration), added to older files at open
_ADDED = (
    ("jobs", "place", "INTEGER"),  # the place in the line a replacing job took over (NULL: its own id)
    ("dead", "key", "TEXT"),  # the dead job's key (refuse_dead_keys)
    ("jobs", "max_runtime", "REAL"),  # the job's own limit per attempt (NULL: its kind's)
    ("jobs", "lane", "TEXT"),  # the job's lane (NULL: none)
    ("dead", "lane", "TEXT"),  # the dead job's lane (a requeue queues it there again)
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload BLOB NOT NULL,
    priority INTEGER NOT NULL, estimate INTEGER NOT NULL, key TEXT, attempts INTEGER NOT NULL,
    interruptions INTEGER NOT NULL, running INTEGER NOT NULL, submitted_at REAL NOT NULL, place INTEGER,
    max_runtime REAL, lane TEXT);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, payload BLOB NOT NULL, priority INTEGER NOT NULL,
    estimate INTEGER NOT NULL, attempts INTEGER NOT NULL, error TEXT NOT NULL,
    submitted_at REAL NOT NULL, failed_at REAL NOT NULL, key TEXT, lane TEXT);
CREATE TABLE IF NOT EXISTS ledger (day TEXT NOT NULL, job INTEGER NOT NULL, micros INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_day ON ledger (day);
"""


class StoreError(OtreeError):
    """The pool's database cannot be used (corrupt, locked, unwritable); names the file."""


class StoredJob(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    kind: str
    payload: Any
    priority: int
    estimate: int
    key: str | None
    attempts: int
    submitted_at: float
    place: int
    max_runtime: float | None
    lane: str | None


class Store:
    """One pool's database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            ensure_private_dir(path.parent)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.5)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            for table, column, declaration in _ADDED:
                if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            self._db.execute("SELECT count(*) FROM jobs").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"pool database {path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        try:
            return self._db.execute(sql, args).lastrowid or 0
        except sqlite3.Error as exc:
            raise StoreError(f"pool database {self.path}: {exc}") from exc

    def recover(self) -> tuple[list[StoredJob], list[StoredJob]]:
        """Jobs to queue again (waiting, and interrupted ones), and the ones interrupted too often.

        An interruption does not use an attempt: the attempt it was counted for is given back.
        """
        self._write(
            "UPDATE jobs SET interruptions = interruptions + 1, attempts = attempts - 1, running = 0 "
            "WHERE running = 1",
            (),
        )
        rows = self._read(
            "SELECT id, kind, payload, priority, estimate, key, attempts, submitted_at, interruptions, "
            "coalesce(place, id) AS place, max_runtime, lane FROM jobs ORDER BY place, id"
        )
        queued: list[StoredJob] = []
        doomed: list[StoredJob] = []
        for (
            job_id,
            kind,
            payload,
            priority,
            estimate,
            key,
            attempts,
            submitted_at,
            interruptions,
            place,
            max_runtime,
            lane,
        ) in rows:
            job = StoredJob(
                id=job_id,
                kind=kind,
                payload=self._decode(payload),
                priority=priority,
                estimate=estimate,
                key=key,
                attempts=attempts,
                submitted_at=submitted_at,
                place=place,
                max_runtime=max_runtime,
                lane=lane,
            )
            (doomed if interruptions >= INTERRUPTIONS_TO_DEAD else queued).append(job)
        return queued, doomed

    def spent(self, day: str) -> int:
        return int(self._read("SELECT coalesce(sum(micros), 0) FROM ledger WHERE day = ?", (day,))[0][0])

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"pool database {self.path}: {exc}") from exc

    def _decode(self, payload: bytes) -> Any:
        try:
            return msgspec.json.decode(payload)
        except msgspec.DecodeError as exc:
            raise StoreError(f"pool database {self.path}: a stored payload is corrupt: {exc}") from exc

    def dead_letters(self) -> list[tuple[Any, ...]]:
        rows = self._read(
            "SELECT id, kind, payload, priority, estimate, attempts, error, submitted_at, failed_at, key, "
            "lane FROM dead ORDER BY id"
        )
        return [(str(r[0]), r[1], self._decode(r[2]), r[3], r[4] / 1e6, *r[5:]) for r in rows]

    def add(
        self,
        kind: str,
        payload: bytes,
        *,
        priority: int,
        estimate: int,
        key: str | None,
        at: float,
        max_runtime: float | None,
        lane: str | None = None,
    ) -> int:
        return self._write(
            "INSERT INTO jobs (kind, payload, priority, estimate, key, attempts, interruptions, running, "
            "submitted_at, max_runtime, lane) VALUES (?, ?, ?, ?, ?, 0, 0, 0, ?, ?, ?)",
            (kind, payload, priority, estimate, key, at, max_runtime, lane),
        )

    def replace(
        self, job: int, kind: str, payload: bytes, *, estimate: int, at: float, max_runtime: float | None
    ) -> int:
        """A new job takes ``job``'s place (its priority, key, lane and place in the line) with a new
        payload, and ``job`` is deleted: one transaction, so a crash keeps one of the two."""
        return self._transaction(
            (
                "INSERT INTO jobs (kind, payload, priority, estimate, key, attempts, interruptions, running, "
                "submitted_at, place, max_runtime, lane) "
                "SELECT ?, ?, priority, ?, key, 0, 0, 0, ?, coalesce(place, id), ?, lane "
                "FROM jobs WHERE id = ?",
                (kind, payload, estimate, at, max_runtime, job),
            ),
            ("DELETE FROM jobs WHERE id = ?", (job,)),
        )

    def started(self, job: int) -> None:
        self._write("UPDATE jobs SET running = 1, attempts = attempts + 1 WHERE id = ?", (job,))

    def waiting(self, job: int) -> None:
        self._write("UPDATE jobs SET running = 0 WHERE id = ?", (job,))

    def put_back(self, job: int) -> None:
        """A running job was stopped with the pool: it runs again next time, the attempt given back."""
        self._write("UPDATE jobs SET running = 0, attempts = attempts - 1 WHERE id = ?", (job,))

    def spend(self, day: str, job: int, micros: int) -> None:
        if micros:
            self._write("INSERT INTO ledger (day, job, micros) VALUES (?, ?, ?)", (day, job, micros))

    def remove(self, job: int) -> None:
        self._write("DELETE FROM jobs WHERE id = ?", (job,))

    def bury(self, job: int, error: str, at: float) -> None:
        """Move a job to the dead letters."""
        self._transaction(
            (
                "INSERT INTO dead (id, kind, payload, priority, estimate, attempts, error, submitted_at, "
                "failed_at, key, lane) SELECT id, kind, payload, priority, estimate, attempts, ?, "
                "submitted_at, ?, key, lane FROM jobs WHERE id = ?",
                (error, at, job),
            ),
            ("DELETE FROM jobs WHERE id = ?", (job,)),
        )

    def _transaction(self, first: tuple[str, tuple[Any, ...]], *more: tuple[str, tuple[Any, ...]]) -> int:
        """Run the statements in one transaction; the row id the first one inserted."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(*first).lastrowid or 0
                for statement in more:
                    self._db.execute(*statement)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"pool database {self.path}: {exc}") from exc
        return row

    def unbury(self, job: int) -> None:
        self._write("DELETE FROM dead WHERE id = ?", (job,))
