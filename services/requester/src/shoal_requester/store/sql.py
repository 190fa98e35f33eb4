"""The requester's store on SQLAlchemy 2: SQLite (embedded default) or Postgres.

Every query is a plain synchronous SQLAlchemy Core function on a ``Connection``; how it runs
depends on the backend:

* **Postgres**: on the asyncpg engine through ``AsyncConnection.run_sync`` (the driver is
  natively async; concurrent writers are Postgres's business).
* **SQLite**: on the stdlib driver in threads. An async SQLite driver hands every statement to
  its thread and back; here a whole read, or a whole transaction, is one hand-off. All writes
  go to one writer thread that commits whatever is queued in one transaction (group commit):
  one fsync covers many transitions under load and writers never collide on the file lock. A
  batch in which one change fails (a lost compare-and-set) is rolled back and its changes are
  redone one by one, so only that change fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy
import structlog
from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    and_,
    bindparam,
    delete,
    event,
    exists,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from shoal_common.db import OutboxRelay, create_engine, is_sqlite, normalise_url, run_migrations
from shoal_common.errors import Conflict, NotFound
from shoal_common.events import Envelope
from shoal_common.spec import ExecutionStateType, JobHistoryType, JobStateType
from shoal_common.sqlite_store import apply_pragmas
from shoal_requester.domain.model import (
    Changes,
    ExecutionRecord,
    HistoryRecord,
    JobQuery,
    JobRecord,
    NodeRecord,
    NodeStanding,
    history_for,
    standing_changes,
)
from shoal_requester.store.base import HistoryFanout, HistoryListener, Publish
from shoal_requester.store.tables import (
    UTCDateTime,
    executions,
    history,
    job_tags,
    jobs,
    node_standing,
    nodes,
    outbox,
    processed_events,
)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
# IN (...) lists are split so no backend hits its bound-parameter limit.
_CHUNK = 500
# Writes committed together at most (SQLite group commit).
_MAX_BATCH = 256
# With ``commit_spacing_s`` set, only a group this large counts as load: one job at a time
# (groups of one) never waits for the spacing.
_SPACED_FROM_GROUP = 2
_READ_THREADS = 4
# How long a connection waits for SQLite's write lock; the writer's statements on the event loop
# never wait (see SqlRequesterStore._commit_group).
_BUSY_TIMEOUT_MS = 30_000
# list_executions of at most this many jobs is a keyed read, run on the event loop.
_KEYED_READ_JOBS = 8

T = TypeVar("T")

log = structlog.get_logger(__name__)


def _dumps(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


# --- rows <-> records ----------------------------------------------------------------------------


class _ParsedJobs:
    """The parsed forms of jobs written or read lately, by id (ADR 0031).

    A job's wire JSON is written at submit and rarely changes after. Parsing it again on every
    read cost more than the read: orjson, then the Job model the first time anything looks at
    the spec (~0.2 ms). A read takes the parsed forms of the record remembered for its id only
    while the stored text is the text that record was made from. Records share them already
    (``JobRecord.evolve``); nothing changes a record's job in place.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[str, JobRecord]] = OrderedDict()
        self._lock = threading.Lock()  # the writer thread's fallback paths write jobs too

    def remember(self, text: str, record: JobRecord) -> None:
        with self._lock:
            self._entries[record.id] = (text, record)
            self._entries.move_to_end(record.id)
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def made_from(self, job_id: str, text: str) -> JobRecord | None:
        hit = self._entries.get(job_id)
        return hit[1] if hit is not None and hit[0] == text else None


# Jobs in flight at 500 jobs/s are a few hundred; an entry holds one parsed Job.
_PARSED_JOBS = _ParsedJobs(2048)


def _job_row(job: JobRecord) -> dict[str, Any]:
    text = orjson.dumps(dict(job.job)).decode()
    _PARSED_JOBS.remember(text, job)
    return {
        "id": job.id,
        "client_id": job.client_id,
        "job": text,
        "state": job.state.value,
        "version": job.version,
        "created": job.created,
        "updated": job.updated,
        "timeout_at": job.timeout_at,
        "queue_deadline": job.queue_deadline,
        "retries_used": job.retries_used,
        "extra_executions": job.extra_executions,
        "status": job.status,
        "submit_key": job.submit_key,
    }


def _as_is(value: Any) -> Any:
    return value


def _job_record(
    row: Mapping[Any, Any], job: Mapping[str, Any], when: Callable[[Any], Any]
) -> JobRecord:
    """A ``jobs`` row as a record; ``job`` is its parsed wire JSON, ``when`` reads a datetime."""
    return JobRecord(
        id=row["id"],
        client_id=row["client_id"],
        job=job,
        state=JobStateType(row["state"]),
        version=row["version"],
        created=when(row["created"]),
        updated=when(row["updated"]),
        timeout_at=when(row["timeout_at"]),
        queue_deadline=when(row["queue_deadline"]),
        retries_used=row["retries_used"],
        extra_executions=row["extra_executions"],
        status=row["status"],
        submit_key=row["submit_key"],
    )


def _job(row: Row[Any]) -> JobRecord:
    return _job_record(row._mapping, orjson.loads(row.job), _as_is)


def _execution_row(e: ExecutionRecord) -> dict[str, Any]:
    return {
        "id": e.id,
        "job_id": e.job_id,
        "node_id": e.node_id,
        "state": e.state.value,
        "version": e.version,
        "accepted_ask_for_bid": e.accepted_ask_for_bid,
        "status": e.status,
        "run_output": _dumps(e.run_output),
        "result_cid": e.result_cid,
        "published": _dumps(e.published),
        "verification": _dumps(e.verification),
        "retryable": e.retryable,
        "created": e.created,
        "updated": e.updated,
    }


def _execution_record(row: Mapping[Any, Any], when: Callable[[Any], Any]) -> ExecutionRecord:
    """An ``executions`` row as a record; ``when`` reads a datetime."""
    return ExecutionRecord(
        id=row["id"],
        job_id=row["job_id"],
        node_id=row["node_id"],
        state=ExecutionStateType(row["state"]),
        version=row["version"],
        accepted_ask_for_bid=bool(row["accepted_ask_for_bid"]),
        status=row["status"],
        run_output=_loads(row["run_output"]),
        result_cid=row["result_cid"],
        published=_loads(row["published"]),
        verification=_loads(row["verification"]),
        retryable=bool(row["retryable"]),
        created=when(row["created"]),
        updated=when(row["updated"]),
    )


def _execution(row: Row[Any]) -> ExecutionRecord:
    return _execution_record(row._mapping, _as_is)


def _utc(text: str | None) -> datetime | None:
    """A datetime column as UTCDateTime reads it from SQLite (naive UTC text)."""
    return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)


def _job_of(values: Sequence[Any]) -> JobRecord:
    """A ``jobs`` row in ``_JOB_COLUMNS`` order, straight from the SQLite driver."""
    row = dict(zip(_JOB_COLUMNS, values, strict=True))
    text = row["job"]
    earlier = _PARSED_JOBS.made_from(row["id"], text)
    record = _job_record(row, orjson.loads(text) if earlier is None else earlier.job, _utc)
    if earlier is not None:
        for parsed in ("model", "resources"):
            if parsed in earlier.__dict__:
                record.__dict__[parsed] = earlier.__dict__[parsed]
    _PARSED_JOBS.remember(text, record)  # what is parsed on it later is kept too
    return record


def _execution_of(values: Sequence[Any]) -> ExecutionRecord:
    """An ``executions`` row in ``_EXECUTION_COLUMNS`` order, straight from the SQLite driver."""
    return _execution_record(dict(zip(_EXECUTION_COLUMNS, values, strict=True)), _utc)


def _history_row(h: HistoryRecord) -> dict[str, Any]:
    return {
        "job_id": h.job_id,
        "type": h.type.value,
        "execution_id": h.execution_id,
        "node_id": h.node_id,
        "previous": h.previous,
        "new": h.new,
        "version": h.version,
        "comment": h.comment,
        "time": h.time,
    }


def _history(row: Row[Any]) -> HistoryRecord:
    return HistoryRecord(
        seq=row.seq,
        job_id=row.job_id,
        type=JobHistoryType(row.type),
        execution_id=row.execution_id,
        node_id=row.node_id,
        previous=row.previous,
        new=row.new,
        version=row.version,
        comment=row.comment,
        time=row.time,
    )


def _node(row: Row[Any]) -> NodeRecord:
    return NodeRecord(
        id=row.id,
        info=orjson.loads(row.info),
        state=row.state,
        first_seen=row.first_seen,
        last_seen=row.last_seen,
        standing=NodeStanding(
            completed=row.completed or 0,
            failed=row.failed or 0,
            rejected=row.rejected or 0,
            last_rejected=row.last_rejected,
        ),
    )


def _standing_upsert(dialect: str) -> Any:
    """Add to a node's counters, creating its row on first use (one statement, no race)."""
    ins = (sqlite_insert if dialect == "sqlite" else pg_insert)(node_standing)
    col = node_standing.c
    return ins.on_conflict_do_update(
        index_elements=[col.node_id],
        set_={
            "completed": col.completed + ins.excluded.completed,
            "failed": col.failed + ins.excluded.failed,
            "rejected": col.rejected + ins.excluded.rejected,
            "last_rejected": sqlalchemy.func.coalesce(
                ins.excluded.last_rejected, col.last_rejected
            ),
        },
    )


_UPSERT_STANDING = {d: _standing_upsert(d) for d in ("sqlite", "postgresql")}


def _chunks(items: Sequence[str]) -> list[Sequence[str]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


# --- the queries (sync; see the module docstring for how they run) --------------------------------


@dataclass
class _Written:
    """What one write produced, and what to announce once it is committed."""

    result: Any
    rows: list[HistoryRecord] = field(default_factory=list)
    events: bool = False


_Op = Callable[[Connection], _Written]
# ``Connection.info`` key of the open SQLite group commit's deferred writes (see _Group).
_GROUP = "shoal_group"


@dataclass
class _Group:
    """Row writes that the changes of one SQLite group commit leave to its end.

    Each kind goes in as one ``executemany`` (one round through the driver and the GIL for the
    group instead of one per change): compare-and-set updates of jobs and executions, inserts
    of executions, history rows. Deferring keeps their order within each kind, and nothing in a
    group reads these rows back. A compare-and-set that then matches fewer rows than it
    should raises Conflict for the whole group, which the writer redoes change by change
    (``_commit``), so exactly the change that lost fails, as before. Everything else a change
    writes (events marked processed, jobs created, outbox, node standing) is written at once.
    """

    job_updates: list[Mapping[str, Any]] = field(default_factory=list)
    execution_inserts: list[Mapping[str, Any]] = field(default_factory=list)
    execution_updates: list[Mapping[str, Any]] = field(default_factory=list)
    history: list[list[HistoryRecord]] = field(default_factory=list)


# Hot-path statements are built once: constructing a SQLAlchemy statement and its cache key
# costs more CPU than executing it, and these run several times per job.
_JOB_FIELDS: tuple[str, ...] = (
    "job",
    "state",
    "version",
    "updated",
    "timeout_at",
    "queue_deadline",
    "retries_used",
    "extra_executions",
    "status",
)
_EXECUTION_FIELDS: tuple[str, ...] = (
    "node_id",
    "state",
    "version",
    "accepted_ask_for_bid",
    "status",
    "run_output",
    "result_cid",
    "published",
    "verification",
    "retryable",
    "updated",
)

_SELECT_JOB = select(jobs).where(jobs.c.id == bindparam("b_id"))
_SELECT_BY_SUBMIT_KEY = select(jobs).where(jobs.c.submit_key == bindparam("b_key"))
_SELECT_EXECUTION = select(executions).where(executions.c.id == bindparam("b_id"))
_SELECT_JOB_EXECUTIONS = (
    select(executions)
    .where(executions.c.job_id == bindparam("b_job"))
    .order_by(executions.c.created, executions.c.id)
)
# A replayed submit (the same signed payload) conflicts on submit_key and inserts nothing:
# one statement for a new submit, without looking for a replay first.
_INSERT_JOB = {
    "sqlite": sqlite_insert(jobs).on_conflict_do_nothing(index_elements=[jobs.c.submit_key]),
    "postgresql": pg_insert(jobs).on_conflict_do_nothing(index_elements=[jobs.c.submit_key]),
}
# The keyed reads every event and placement makes (a job, its executions) on the SQLite
# driver: SQLAlchemy's execution context, result set-up and type processing cost several times
# the indexed lookup itself (ADR 0031). The columns are named, so the tuples' order is fixed.
_JOB_COLUMNS = tuple(c.name for c in jobs.columns)
_EXECUTION_COLUMNS = tuple(c.name for c in executions.columns)
_SQLITE_FIND_JOB = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?"


@functools.lru_cache(maxsize=_KEYED_READ_JOBS)
def _sqlite_executions_of(count: int) -> str:
    marks = ", ".join("?" * count)
    return (
        f"SELECT {', '.join(_EXECUTION_COLUMNS)} FROM executions "
        f"WHERE job_id IN ({marks}) ORDER BY created, id"
    )


_INSERT_TAGS = insert(job_tags)
_INSERT_EXECUTIONS = insert(executions)
_INSERT_OUTBOX = insert(outbox)
_DELETE_OUTBOX_ROW = delete(outbox).where(outbox.c.seq == bindparam("b_seq"))
_INSERT_HISTORY = insert(history)
_HISTORY_COLUMNS = (
    "job_id",
    "type",
    "execution_id",
    "node_id",
    "previous",
    "new",
    "version",
    "comment",
    "time",
)
_INSERT_HISTORY_ONE = insert(history).returning(history.c.seq)
_INSERT_HISTORY_MANY = insert(history).returning(history.c.seq, sort_by_parameter_order=True)
_MARK_PROCESSED = {
    "sqlite": sqlite_insert(processed_events).on_conflict_do_nothing(),
    "postgresql": pg_insert(processed_events).on_conflict_do_nothing(),
}


def _compare_and_set(table: Table, fields: Sequence[str]) -> Any:
    """Compare-and-set: the row changes only if it is still at the (state, version) it was
    read at."""
    return (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            table.c.state == bindparam("b_state"),
            table.c.version == bindparam("b_version"),
        )
        .values({table.c[f]: bindparam(f) for f in fields})
    )


_UPDATE_JOB = _compare_and_set(jobs, _JOB_FIELDS)
# The same without the job's wire JSON, for the usual update that leaves it as it was: no JSON
# dump per transition, and no rewriting kilobytes of text that did not change.
_JOB_STATE_FIELDS = tuple(f for f in _JOB_FIELDS if f != "job")
_UPDATE_JOB_STATE = _compare_and_set(jobs, _JOB_STATE_FIELDS)
_UPDATE_EXECUTION = _compare_and_set(executions, _EXECUTION_FIELDS)


_SQLITE = sqlite_dialect.dialect(paramstyle="qmark")


@dataclass(frozen=True)
class _SqliteStatement:
    """A prebuilt statement compiled once for the stdlib driver, for one set of keys."""

    text: str
    get: Callable[[Mapping[str, Any]], tuple[Any, ...]]  # a row's values in bind order
    datetimes: tuple[int, ...]  # positions of UTCDateTime binds
    order: tuple[str, ...]  # the bind names, in order


_SQLITE_SQL: dict[tuple[int, tuple[str, ...]], _SqliteStatement] = {}


def _sqlite_datetime(value: datetime) -> str:
    """What UTCDateTime + SQLAlchemy's SQLite DATETIME store: naive UTC text, microseconds."""
    if value.tzinfo is None:  # UTCDateTime reads a naive value as UTC
        return value.isoformat(" ", "microseconds")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _sqlite_statement(stmt: Any, keys: tuple[str, ...]) -> _SqliteStatement:
    cached = _SQLITE_SQL.get((id(stmt), keys))
    if cached is None:
        compiled = stmt.compile(dialect=_SQLITE, column_keys=list(keys))
        order = tuple(compiled.positiontup or ())
        get: Callable[[Mapping[str, Any]], tuple[Any, ...]]
        if len(order) == 1:
            [only] = order

            def get(row: Mapping[str, Any]) -> tuple[Any, ...]:
                return (row[only],)

        else:
            get = operator.itemgetter(*order)
        datetimes = tuple(
            i for i, name in enumerate(order) if isinstance(compiled.binds[name].type, UTCDateTime)
        )
        cached = _SqliteStatement(str(compiled), get, datetimes, order)
        _SQLITE_SQL[(id(stmt), keys)] = cached
    return cached


# The stored text of recent datetimes: one transition binds the same ``now`` several times
# (updated, created, every history row's time), and a group commit holds many transitions.
# Equal datetimes (the same instant, in any zone) have the same text.
@functools.lru_cache(maxsize=1024)
def _datetime_text(value: datetime) -> str:
    return _sqlite_datetime(value)


def _sqlite_params(statement: _SqliteStatement, row: Mapping[str, Any]) -> Sequence[Any]:
    values = statement.get(row)
    if not statement.datetimes:
        return values
    out = list(values)
    for i in statement.datetimes:
        value = out[i]
        if value is not None:
            out[i] = _datetime_text(value)
    return out


def _run(
    conn: Connection,
    stmt: Any,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    returning: bool = False,
) -> tuple[int, list[Any]]:
    """Execute a prebuilt write statement; (rowcount, RETURNING values).

    On SQLite the statement goes straight to the driver (compiled once per set of keys):
    SQLAlchemy's execution machinery costs several times the statement itself, and these
    run a dozen times per job in the single writer thread. Elsewhere, through SQLAlchemy.
    """
    many = not isinstance(params, Mapping)
    if conn.dialect.name != "sqlite":
        result = conn.execute(stmt, params)
        return result.rowcount, (list(result.scalars()) if returning else [])
    rows: Sequence[Mapping[str, Any]] = [params] if isinstance(params, Mapping) else params
    if not rows:
        return 0, []
    statement = _sqlite_statement(stmt, tuple(rows[0]))
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        if returning:
            out = []
            for row in rows:
                cursor.execute(statement.text, _sqlite_params(statement, row))
                fetched = cursor.fetchone()
                assert fetched is not None
                out.append(fetched[0])
            return len(out), out
        if many:
            cursor.executemany(statement.text, [_sqlite_params(statement, r) for r in rows])
        else:
            cursor.execute(statement.text, _sqlite_params(statement, rows[0]))
        return int(cursor.rowcount), []
    except sqlite3.Error as exc:
        raise _translated(exc, statement.text, conn.dialect) from exc
    finally:
        cursor.close()


def _translated(exc: sqlite3.Error, text: str, dialect: Any) -> BaseException:
    """The SQLAlchemy exception SQLAlchemy would have raised (IntegrityError, OperationalError,
    ...): callers catch those, e.g. shoal_common.db.DATABASE_UNAVAILABLE."""
    return DBAPIError.instance(text, None, exc, sqlite3.Error, dialect=dialect)


def _find_job(conn: Connection, job_id: str) -> JobRecord | None:
    row = conn.execute(_SELECT_JOB, {"b_id": job_id}).first()
    return _job(row) if row is not None else None


def _find_by_submit_key(conn: Connection, key: str) -> JobRecord | None:
    row = conn.execute(_SELECT_BY_SUBMIT_KEY, {"b_key": key}).first()
    return _job(row) if row is not None else None


def _create_job(conn: Connection, job: JobRecord, first: HistoryRecord) -> _Written:
    inserted, _ = _run(conn, _INSERT_JOB[conn.dialect.name], _job_row(job))
    if not inserted:  # only a submit_key conflict is ignored: this submit was made before
        assert job.submit_key is not None
        existing = _find_by_submit_key(conn, job.submit_key)
        if existing is None:
            raise Conflict(f"submit key {job.submit_key} conflicts, but no job holds it")
        return _Written((existing, False))
    tags = sorted(set(job.annotations))
    if tags:
        _run(conn, _INSERT_TAGS, [{"job_id": job.id, "tag": t} for t in tags])
    return _Written((job, True), rows=_insert_history(conn, [first]))


def _with_seq(h: HistoryRecord, seq: int) -> HistoryRecord:
    # dataclasses.replace costs several times this (it inspects the fields on every call).
    return HistoryRecord(
        job_id=h.job_id,
        type=h.type,
        new=h.new,
        version=h.version,
        time=h.time,
        previous=h.previous,
        comment=h.comment,
        execution_id=h.execution_id,
        node_id=h.node_id,
        seq=seq,
    )


def _insert_history(conn: Connection, rows: list[HistoryRecord]) -> list[HistoryRecord]:
    """Insert history rows; the returned list holds them with their ``seq``.

    Inside a SQLite group commit (``_GROUP`` set) the rows, made for this transaction,
    wait for the group's single insert (:func:`_flush_history`), which sets their ``seq``
    before the commit.
    """
    group: _Group | None = conn.info.get(_GROUP)
    if group is not None:
        group.history.append(rows)
        return rows
    statement = _INSERT_HISTORY_ONE if len(rows) == 1 else _INSERT_HISTORY_MANY
    _, seqs = _run(conn, statement, [_history_row(h) for h in rows], returning=True)
    return [_with_seq(h, s) for h, s in zip(rows, seqs, strict=True)]


def _flush_history(conn: Connection, queue: list[list[HistoryRecord]]) -> None:
    """Insert the history rows a SQLite group's changes queued, as one ``executemany``.

    Their ``seq`` values are consecutive and end at ``last_insert_rowid()``: SQLite gives a row
    inserted without a rowid the largest rowid in the table plus one, and this connection holds
    the write lock for the whole transaction, so nothing else inserts in between.
    """
    rows = [h for group in queue for h in group]
    if not rows:
        return
    statement = _sqlite_statement(_INSERT_HISTORY, _HISTORY_COLUMNS)
    if statement.order == _HISTORY_COLUMNS:  # bind values straight from the records
        values: list[Sequence[Any]] = [
            (
                h.job_id,
                h.type.value,
                h.execution_id,
                h.node_id,
                h.previous,
                h.new,
                h.version,
                h.comment,
                _datetime_text(h.time),
            )
            for h in rows
        ]
    else:
        values = [_sqlite_params(statement, _history_row(h)) for h in rows]
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(statement.text, values)
        (last,) = cursor.execute("SELECT last_insert_rowid()").fetchone()
    except sqlite3.Error as exc:
        raise _translated(exc, statement.text, conn.dialect) from exc
    finally:
        cursor.close()
    # The records were made for this transaction and nobody has seen them yet: their seq is
    # set in place (HistoryRecord.seq is "assigned by the store"), not by copying each one.
    for seq, h in enumerate(rows, start=last - len(rows) + 1):
        object.__setattr__(h, "seq", seq)


def _mark_processed(conn: Connection, event_id: str) -> bool:
    """Record a handled event id in one statement; False if it was there already."""
    values = {"event_id": event_id, "processed": time.time()}
    count, _ = _run(conn, _MARK_PROCESSED[conn.dialect.name], values)
    return count == 1


def _stage_events(conn: Connection, envelopes: Sequence[Envelope]) -> None:
    """The outbox rows shoal_common.db.OutboxRelay publishes after commit."""
    now = time.time()
    _run(
        conn,
        _INSERT_OUTBOX,
        [{"event_id": env.id, "envelope": env.to_bytes(), "created": now} for env in envelopes],
    )


def _apply(conn: Connection, changes: Changes, envelopes: Sequence[Envelope]) -> _Written:
    group: _Group | None = conn.info.get(_GROUP)
    rows = history_for(changes)
    if changes.processed_event is not None and not _mark_processed(conn, changes.processed_event):
        return _Written(None)
    for ju in changes.jobs:
        after = ju.after
        params = {
            "state": after.state.value,
            "version": after.version,
            "updated": after.updated,
            "timeout_at": after.timeout_at,
            "queue_deadline": after.queue_deadline,
            "retries_used": after.retries_used,
            "extra_executions": after.extra_executions,
            "status": after.status,
            "b_id": ju.before.id,
            "b_state": ju.before.state.value,
            "b_version": ju.before.version,
        }
        statement = _UPDATE_JOB_STATE
        if after.job is not ju.before.job and after.job != ju.before.job:
            params["job"] = _dumps(dict(after.job))
            statement = _UPDATE_JOB
        elif group is not None:
            group.job_updates.append(params)
            continue
        if _run(conn, statement, params)[0] != 1:
            raise Conflict(f"job {ju.before.id} changed since it was read")
    inserts = [_execution_row(eu.after) for eu in changes.executions if eu.before is None]
    if inserts:
        if group is not None:
            group.execution_inserts.extend(inserts)
        else:
            _run(conn, _INSERT_EXECUTIONS, inserts)
    for eu in changes.executions:
        if eu.before is None:
            continue
        row = _execution_row(eu.after)
        params = {f: row[f] for f in _EXECUTION_FIELDS}
        params.update(b_id=eu.before.id, b_state=eu.before.state.value, b_version=eu.before.version)
        if group is not None:
            group.execution_updates.append(params)
        elif _run(conn, _UPDATE_EXECUTION, params)[0] != 1:
            raise Conflict(f"execution {eu.before.id} changed since it was read")
    if rows:
        rows = _insert_history(conn, rows)
    standing = standing_changes(changes)
    if standing:
        _run(
            conn,
            _UPSERT_STANDING[conn.dialect.name],
            [
                {
                    "node_id": node_id,
                    "completed": s.completed,
                    "failed": s.failed,
                    "rejected": s.rejected,
                    "last_rejected": s.last_rejected,
                }
                for node_id, s in sorted(standing.items())
            ],
        )
    if changes.events:
        _stage_events(conn, envelopes)
    return _Written(rows, rows=rows, events=bool(changes.events))


def _upsert_node(conn: Connection, node: NodeRecord) -> _Written:
    values = {
        "info": _dumps(dict(node.info)),
        "state": node.state,
        "last_seen": node.last_seen,
    }
    result = conn.execute(update(nodes).where(nodes.c.id == node.id).values(values))
    if result.rowcount == 0:
        conn.execute(insert(nodes).values(id=node.id, first_seen=node.first_seen, **values))
    return _Written(None)


def _list_jobs(conn: Connection, query: JobQuery) -> list[JobRecord]:
    stmt = select(jobs)
    if query.client_id is not None:
        stmt = stmt.where(jobs.c.client_id == query.client_id)
    if query.states:
        stmt = stmt.where(jobs.c.state.in_([s.value for s in query.states]))
    if query.include_tags:
        stmt = stmt.where(
            exists().where(job_tags.c.job_id == jobs.c.id, job_tags.c.tag.in_(query.include_tags))
        )
    if query.exclude_tags:
        stmt = stmt.where(
            ~exists().where(job_tags.c.job_id == jobs.c.id, job_tags.c.tag.in_(query.exclude_tags))
        )
    key = jobs.c.created if query.sort_by == "created_at" else jobs.c.id
    order = [key.desc(), jobs.c.id.desc()] if query.reverse else [key.asc(), jobs.c.id.asc()]
    stmt = stmt.order_by(*order)
    if query.limit > 0:
        stmt = stmt.limit(query.limit)
    return [_job(r) for r in conn.execute(stmt).all()]


def _list_executions(conn: Connection, job_ids: Sequence[str]) -> dict[str, list[ExecutionRecord]]:
    out: dict[str, list[ExecutionRecord]] = {j: [] for j in job_ids}
    if len(out) == 1:
        [job_id] = out
        rows = conn.execute(_SELECT_JOB_EXECUTIONS, {"b_job": job_id}).all()
        out[job_id] = [_execution(r) for r in rows]
        return out
    for chunk in _chunks(list(dict.fromkeys(job_ids))):
        result = conn.execute(
            select(executions)
            .where(executions.c.job_id.in_(chunk))
            .order_by(executions.c.created, executions.c.id)
        )
        for row in result.all():
            out[row.job_id].append(_execution(row))
    return out


def _write_lock_busy(exc: BaseException) -> bool:
    """SQLite's write lock is held by another connection (SQLITE_BUSY or an extended form)."""
    code = getattr(getattr(exc, "orig", exc), "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def _set_busy_timeout(conn: Connection, ms: int) -> None:
    # On the driver: a PRAGMA opens no transaction there, and SQLAlchemy's own state is left
    # alone (the connection may be between groups, or about to begin one).
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    dbapi.execute(f"PRAGMA busy_timeout={int(ms)}")


def _rollback_quietly(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.rollback()


def _sqlite_engine(url: str) -> Engine:
    """The stdlib driver with the pragmas of shoal_common.db.create_engine (durable commits)."""
    sync_url = make_url(normalise_url(url)).set(drivername="sqlite+pysqlite")
    path = sync_url.database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(
        sync_url,
        connect_args={"timeout": 30, "check_same_thread": False},
        pool_size=_READ_THREADS + 1,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        apply_pragmas(dbapi_conn, _BUSY_TIMEOUT_MS)

    return engine


def _run_group(conn: Connection, ops: list[_Op]) -> list[_Written | BaseException]:
    """Run ``ops`` in the open transaction, then their deferred writes (:class:`_Group`)."""
    group = _Group()
    conn.info[_GROUP] = group
    try:
        written: list[_Written | BaseException] = [op(conn) for op in ops]
    finally:
        del conn.info[_GROUP]
    _flush_group(conn, group)
    return written


def _flush_group(conn: Connection, group: _Group) -> None:
    # In the order _apply writes them. A reordering across changes could only make a
    # compare-and-set miss (versions only grow), never match wrongly: then the group is redone
    # change by change.
    _compare_and_set_all(conn, _UPDATE_JOB_STATE, group.job_updates, "job")
    if group.execution_inserts:
        _run(conn, _INSERT_EXECUTIONS, group.execution_inserts)
    _compare_and_set_all(conn, _UPDATE_EXECUTION, group.execution_updates, "execution")
    _flush_history(conn, group.history)


def _compare_and_set_all(
    conn: Connection, statement: Any, params: list[Mapping[str, Any]], what: str
) -> None:
    if not params:
        return
    # Each update matches at most its one row (by id): all took effect iff the count is all.
    if _run(conn, statement, params)[0] != len(params):
        ids = ", ".join(str(p["b_id"]) for p in params[:3]) + (", ..." if len(params) > 3 else "")
        raise Conflict(f"{what} {ids} changed since it was read")


def _expired_jobs(now: datetime, limit: int) -> Any:
    """Jobs past their timeout or queue deadline; each term is served by its partial index."""
    return (
        select(jobs)
        .where(
            or_(
                and_(
                    jobs.c.timeout_at <= now,
                    jobs.c.state.in_([JobStateType.IN_PROGRESS.value, JobStateType.QUEUED.value]),
                ),
                and_(jobs.c.queue_deadline <= now, jobs.c.state == JobStateType.QUEUED.value),
            )
        )
        .order_by(jobs.c.created)
        .limit(limit)
    )


# --- the store -----------------------------------------------------------------------------------


class SqlRequesterStore:
    """:class:`~shoal_requester.store.base.RequesterStore` on SQLite or Postgres."""

    def __init__(self, url: str, *, migrate: bool = True, commit_spacing_s: float = 0.0) -> None:
        self._url = url
        self._migrate = migrate
        # SQLite: under load, a group commit starts at least this long after the one before
        # (RequesterSettings.commit_spacing_ms; ADR 0033). Off by default.
        self._commit_spacing_s = commit_spacing_s
        self._sqlite = is_sqlite(url)
        self._fanout = HistoryFanout()
        self._relay: OutboxRelay | None = None
        # Postgres: the asyncpg engine. SQLite: the async engine serves the outbox relay only.
        self._engine: AsyncEngine | None = None
        # SQLite only:
        self._sync: Engine | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._writer_conn: Connection | None = None
        self._keyed: Any = None  # the loop's driver connection for keyed reads (_keyed_rows)
        self._queue: list[tuple[_Op, asyncio.Future[_Written]]] = []
        self._relayed: list[int] = []  # outbox rows relayed, deleted with the next group
        self._wake = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        if self._migrate:
            await asyncio.to_thread(run_migrations, self._url, MIGRATIONS)
        self._engine = create_engine(self._url)
        if self._sqlite:
            self._sync = _sqlite_engine(self._url)
            self._readers = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="requester-db")
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="requester-db-writer")
            self._writer_task = asyncio.create_task(self._write_loop(), name="requester-db-writer")

    async def close(self) -> None:
        await self.stop_outbox()
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        for _op, fut in self._queue:
            if not fut.done():
                fut.set_exception(RuntimeError("store closed"))
        self._queue.clear()
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._close_writer)
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        if self._keyed is not None:
            self._keyed.close()  # back to the pool, disposed with it
            self._keyed = None
        if self._sync is not None:
            self._sync.dispose()
            self._sync = None
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError("store not open")
        return self._engine

    # --- running queries -------------------------------------------------------------------

    async def _read(self, query: Callable[[Connection], T]) -> T:
        if not self._sqlite:
            async with self.engine.connect() as conn:
                return await conn.run_sync(query)
        if self._readers is None or self._sync is None:
            raise RuntimeError("store not open")
        engine = self._sync

        def run() -> T:
            with engine.connect() as conn:
                return query(conn)

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    async def _read_by_key(self, query: Callable[[Connection], T]) -> T:
        """A read of a few rows by key (a job, its executions): on SQLite, run here.

        An indexed lookup in a local file takes microseconds; sent to a reader thread it paid
        two thread hops and made the event loop wait for the GIL behind that thread's row
        processing, up to the 5 ms switch interval per hand-over (ADR 0018). Listings, which
        can be long, stay in the reader threads.
        """
        if not self._sqlite:
            return await self._read(query)
        if self._sync is None:
            raise RuntimeError("store not open")
        with self._sync.connect() as conn:
            return query(conn)

    def _keyed_rows(self, text: str, params: Sequence[Any]) -> list[Any]:
        """On SQLite: a keyed read run here, on the driver (see ``_read_by_key``).

        The connection is the loop's own, kept open: a pool checkout and its reset on return
        cost more than the lookup. Outside a transaction, each SELECT reads the last commit,
        and the snapshot ends with the statement (all rows fetched, cursor closed).
        """
        if self._sync is None:
            raise RuntimeError("store not open")
        if self._keyed is None:
            self._keyed = self._sync.raw_connection()
        cursor = self._keyed.cursor()
        try:
            return list(cursor.execute(text, params).fetchall())
        except sqlite3.Error as exc:
            raise _translated(exc, text, self._sync.dialect) from exc
        finally:
            cursor.close()

    async def _write(self, op: _Op, *, on_ordered: Callable[[], None] | None = None) -> Any:
        if not self._sqlite:
            async with self.engine.begin() as conn:
                written = await conn.run_sync(op)
            self._announce(written)
            return written.result
        if self._writer_task is None:
            raise RuntimeError("store not open")
        fut: asyncio.Future[_Written] = asyncio.get_running_loop().create_future()
        self._queue.append((op, fut))
        self._wake.set()
        if on_ordered is not None:
            on_ordered()  # one writer takes the queue in order: later writes commit after this
        return (await fut).result

    async def _write_loop(self) -> None:
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        last_start, last_size = 0.0, 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or self._relayed:
                if last_size >= _SPACED_FROM_GROUP and self._commit_spacing_s:
                    # Writes queued meanwhile join this group: fewer, fuller commits.
                    wait = last_start + self._commit_spacing_s - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                batch = [(op, fut) for op, fut in self._queue[:_MAX_BATCH] if not fut.done()]
                last_start, last_size = loop.time(), len(batch)
                del self._queue[:_MAX_BATCH]
                if not batch:
                    if self._relayed:  # only relayed rows to delete (an idle moment)
                        try:
                            await self._commit_group([])
                        except Exception as exc:  # the rows stay; sent again after a restart
                            log.warning("outbox_delete_failed", error=repr(exc))
                        if self._relayed:  # failed and put back: again with the next write
                            break
                    continue
                try:
                    outcomes = await self._commit_group([op for op, _ in batch])
                except asyncio.CancelledError:
                    for _op, fut in batch:
                        if not fut.done():
                            fut.set_exception(RuntimeError("store closed"))
                    raise
                except Exception as exc:  # the batch could not run at all (disk, driver)
                    outcomes = [exc] * len(batch)
                for (_op, fut), outcome in zip(batch, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        if not fut.done():
                            fut.set_exception(outcome)
                        continue
                    self._announce(outcome)
                    if not fut.done():
                        fut.set_result(outcome)

    async def _commit_group(self, ops: list[_Op]) -> list[_Written | BaseException]:
        """All ops in one transaction, or each on its own if one fails.

        The statements run here, on the event loop: they take microseconds each, and run in
        the writer thread they paid a GIL hand-over per statement, several milliseconds each
        while the loop was busy (ADR 0018). Only the COMMIT, where the fsync is, goes to the
        writer thread. Nothing of ours writes the file besides: the outbox relay's deletes
        ride along in the next group (``_delete_relayed``). Should another connection hold
        the write lock anyway (an operator's tool), the writer connection does not wait for it
        here (busy timeout 0): the group is run again in the writer thread, which may wait
        without stopping the loop.
        """
        loop = asyncio.get_running_loop()
        conn = self._writer_connection()
        relayed, self._relayed = self._relayed, []
        transaction = conn.begin()
        try:
            if relayed:
                _run(conn, _DELETE_OUTBOX_ROW, [{"b_seq": seq} for seq in relayed])
            written = _run_group(conn, ops)
        except Exception as exc:
            transaction.rollback()
            self._relayed.extend(relayed)  # with the next group
            if _write_lock_busy(exc):  # someone else writes the file: wait in the thread
                return await loop.run_in_executor(self._writer, self._commit_waiting, ops)
            if len(ops) <= 1:
                return [exc] * len(ops)
            return await loop.run_in_executor(self._writer, self._commit_each, ops)
        try:
            # shield: a cancelled writer still finishes (or fails) the fsync in flight.
            await asyncio.shield(loop.run_in_executor(self._writer, transaction.commit))
        except Exception as exc:
            await asyncio.shield(loop.run_in_executor(self._writer, _rollback_quietly, conn))
            self._relayed.extend(relayed)
            return [exc] * len(ops)
        return written

    def _writer_connection(self) -> Connection:
        if self._writer_conn is None:
            assert self._sync is not None
            self._writer_conn = self._sync.connect()
            _set_busy_timeout(self._writer_conn, 0)
        return self._writer_conn

    def _commit_waiting(self, ops: list[_Op]) -> list[_Written | BaseException]:
        """In the writer thread: the group as one transaction (each op alone if that fails),
        waiting for the write lock as long as the usual busy timeout allows."""
        conn = self._writer_connection()
        _set_busy_timeout(conn, _BUSY_TIMEOUT_MS)
        try:
            try:
                with conn.begin():
                    return _run_group(conn, ops)
            except Exception as exc:
                if len(ops) <= 1:
                    return [exc] * len(ops)
            return self._commit_each(ops)
        finally:
            _set_busy_timeout(conn, 0)

    def _commit_each(self, ops: list[_Op]) -> list[_Written | BaseException]:
        """In the writer thread: each op in a transaction of its own (a group failed)."""
        conn = self._writer_connection()
        outcomes: list[_Written | BaseException] = []
        for op in ops:
            try:
                with conn.begin():
                    outcomes.extend(_run_group(conn, [op]))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    async def _delete_relayed(self, seqs: list[int]) -> None:
        """Relayed outbox rows are deleted in the writer's next group (one is started if none
        is coming): no second connection writes the file, and no commit of their own."""
        self._relayed.extend(seqs)
        self._wake.set()

    def _close_writer(self) -> None:
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None

    def _announce(self, written: _Written) -> None:
        if written.events and self._relay is not None:
            self._relay.notify()
        self._fanout.notify(written.rows)

    # --- writes ----------------------------------------------------------------------------

    async def create_job(
        self,
        job: JobRecord,
        *,
        comment: str = "Job created",
        on_ordered: Callable[[], None] | None = None,
    ) -> tuple[JobRecord, bool]:
        first = HistoryRecord(
            job_id=job.id,
            type=JobHistoryType.JOB_LEVEL,
            new=job.state.value,
            version=job.version,
            time=job.created,
            comment=comment,
        )
        try:
            result: tuple[JobRecord, bool] = await self._write(
                lambda conn: _create_job(conn, job, first), on_ordered=on_ordered
            )
        except IntegrityError:
            # Another request with the same signed payload won the race: answer with its job.
            if job.submit_key is None:
                raise
            existing = await self.find_job_by_submit_key(job.submit_key)
            if existing is None:
                raise
            return existing, False
        return result

    async def apply(self, changes: Changes) -> list[HistoryRecord] | None:
        # Wrapped here, not on the writer thread: each event carries the trace of the work
        # that made it (a thread does not see the loop's context).
        envelopes = [Envelope.wrap(e) for e in changes.events]
        result: list[HistoryRecord] | None = await self._write(
            lambda conn: _apply(conn, changes, envelopes)
        )
        return result

    # --- reads -----------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._read_by_key(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())

    async def find_job(self, job_id: str) -> JobRecord | None:
        if self._sqlite:
            rows = self._keyed_rows(_SQLITE_FIND_JOB, (job_id,))
            return _job_of(rows[0]) if rows else None
        return await self._read_by_key(lambda conn: _find_job(conn, job_id))

    async def get_job(self, job_id: str) -> JobRecord:
        job = await self.find_job(job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    async def find_job_by_submit_key(self, submit_key: str) -> JobRecord | None:
        return await self._read_by_key(lambda conn: _find_by_submit_key(conn, submit_key))

    async def find_job_ids(self, prefix: str, *, limit: int = 2, suffix: bool = False) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = "%" + escaped if suffix else escaped + "%"

        def query(conn: Connection) -> list[str]:
            result = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.id.like(pattern, escape="\\"))
                .order_by(jobs.c.id)
                .limit(limit)
            )
            return list(result.scalars())

        return await self._read(query)

    async def list_jobs(self, query: JobQuery) -> list[JobRecord]:
        return await self._read(lambda conn: _list_jobs(conn, query))

    async def list_jobs_in_states(
        self,
        states: Sequence[JobStateType],
        *,
        updated_before: datetime | None = None,
        limit: int = 1000,
    ) -> list[JobRecord]:
        stmt = select(jobs).where(jobs.c.state.in_([s.value for s in states]))
        if updated_before is not None:
            stmt = stmt.where(jobs.c.updated < updated_before)
        stmt = stmt.order_by(jobs.c.created, jobs.c.id).limit(limit)
        return await self._read(lambda conn: [_job(r) for r in conn.execute(stmt).all()])

    async def list_expired_jobs(self, now: datetime, *, limit: int = 1000) -> list[JobRecord]:
        stmt = _expired_jobs(now, limit)
        return await self._read(lambda conn: [_job(r) for r in conn.execute(stmt).all()])

    async def find_execution(self, execution_id: str) -> ExecutionRecord | None:
        def query(conn: Connection) -> ExecutionRecord | None:
            row = conn.execute(_SELECT_EXECUTION, {"b_id": execution_id}).first()
            return _execution(row) if row is not None else None

        return await self._read_by_key(query)

    async def list_executions(self, job_ids: Sequence[str]) -> dict[str, list[ExecutionRecord]]:
        if not job_ids:
            return {}
        if len(job_ids) <= _KEYED_READ_JOBS:
            if self._sqlite:
                wanted = list(dict.fromkeys(job_ids))
                out: dict[str, list[ExecutionRecord]] = {j: [] for j in wanted}
                for values in self._keyed_rows(_sqlite_executions_of(len(wanted)), wanted):
                    record = _execution_of(values)
                    out[record.job_id].append(record)
                return out
            return await self._read_by_key(lambda conn: _list_executions(conn, job_ids))
        return await self._read(lambda conn: _list_executions(conn, job_ids))

    async def list_executions_in_states(
        self,
        states: Sequence[ExecutionStateType],
        *,
        node_ids: Sequence[str] | None = None,
        updated_before: datetime | None = None,
        limit: int = 10_000,
    ) -> list[ExecutionRecord]:
        stmt = select(executions).where(executions.c.state.in_([s.value for s in states]))
        if node_ids is not None:
            if not node_ids:
                return []
            stmt = stmt.where(executions.c.node_id.in_(list(node_ids)))
        if updated_before is not None:
            stmt = stmt.where(executions.c.updated < updated_before)
        stmt = stmt.order_by(executions.c.created).limit(limit)
        return await self._read(lambda conn: [_execution(r) for r in conn.execute(stmt).all()])

    async def list_history(
        self,
        job_id: str,
        *,
        since: datetime | None = None,
        types: Sequence[JobHistoryType] | None = None,
    ) -> list[HistoryRecord]:
        stmt = select(history).where(history.c.job_id == job_id)
        if since is not None:
            stmt = stmt.where(history.c.time >= since)
        if types is not None:
            stmt = stmt.where(history.c.type.in_([t.value for t in types]))
        stmt = stmt.order_by(history.c.seq)
        return await self._read(lambda conn: [_history(r) for r in conn.execute(stmt).all()])

    # --- nodes -----------------------------------------------------------------------------

    async def upsert_node(self, node: NodeRecord) -> None:
        await self._write(lambda conn: _upsert_node(conn, node))

    async def list_nodes(self) -> list[NodeRecord]:
        stmt = (
            select(
                nodes,
                node_standing.c.completed,
                node_standing.c.failed,
                node_standing.c.rejected,
                node_standing.c.last_rejected,
            )
            .select_from(nodes.outerjoin(node_standing, node_standing.c.node_id == nodes.c.id))
            .order_by(nodes.c.id)
        )
        return await self._read(lambda conn: [_node(r) for r in conn.execute(stmt)])

    # --- fan-out and outbox ----------------------------------------------------------------

    def subscribe_history(self, listener: HistoryListener) -> Callable[[], None]:
        return self._fanout.subscribe(listener)

    async def start_outbox(self, publish: Publish) -> None:
        delete_rows = self._delete_relayed if self._sqlite else None
        self._relay = OutboxRelay(
            self.engine, outbox, publish, service="requester", delete_rows=delete_rows
        )
        self._relay.start()
        self._relay.notify()  # events committed before a restart go out at once

    async def stop_outbox(self) -> None:
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
