"""SQLite for one service's store: statements on the event loop, group-committed fsyncs.

Through aiosqlite every statement is two thread hops and a wake-up of the event loop, and every
transaction pays its own fsync. Profiles of the stress benchmark put the database layer at 40%
of the devstack's Python time, most of it that plumbing. A store's statements touch a few rows
of a small local file and take microseconds, so here they run straight on the event loop; only
the commit, where the fsync is, goes to a thread, and every transaction that finished while the
previous commit was on disk shares the next one (group commit).

How a transaction runs:

* ``begin()`` takes the writer lock, opens the shared SQLite transaction if none is open
  (``BEGIN IMMEDIATE``), and wraps the caller's statements in a savepoint: an exception rolls
  back only that caller's work.
* On success the savepoint is released and the caller waits for the group's ``COMMIT``; the
  ``async with`` block exits only once the commit is on disk (``synchronous=FULL``), exactly as
  with a plain engine. If the commit fails, every transaction of the group raises.
* A transaction cannot see another's uncommitted work except inside the same group, which
  commits or fails as one.

``defer(work, done)`` is for writes nobody waits for and that are safe to lose (deleting
outbox rows already published): ``work`` runs in the next transaction anyone begins, in a
savepoint of its own, so it costs no commit of its own; when none begins within
``DEFER_MAX_S`` a transaction is begun for it. ``done`` learns whether it became durable.

``connect()`` reads committed data on pooled connections (WAL: readers never wait for the
writer). The engine exposes the small part of SQLAlchemy's AsyncEngine/AsyncConnection API the
stores use (``begin``, ``connect``, ``execute``, ``begin_nested``, ``run_sync``, ``dispose``),
so a store works unchanged on this (SQLite) or on an asyncpg AsyncEngine (Postgres).

Only one process may write the file: the single writer holds SQLite's write lock from the first
statement of a group to its commit (a few milliseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import operator
import sqlite3
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

import sqlalchemy
import structlog
from sqlalchemy import event
from sqlalchemy.engine import Connection, CursorResult, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from shoal_common import tracing

T = TypeVar("T")
log = structlog.get_logger(__name__)

# The engine whose writer lock the current task holds: a nested begin() would wait for itself.
_HOLDING: contextvars.ContextVar[GroupCommitEngine | None] = contextvars.ContextVar(
    "shoal_group_commit_holding", default=None
)


class LoopConnection:
    """A sync SQLAlchemy connection behind the awaitable API of ``AsyncConnection``."""

    def __init__(self, conn: Connection) -> None:
        self.sync_connection = conn

    async def execute(self, statement: Any, parameters: Any = None) -> CursorResult[Any]:
        if parameters and getattr(statement, "is_dml", False) and not tracing.enabled():
            dml = _dml(statement, parameters, self.sync_connection.dialect)
            if dml is not None:
                return cast(CursorResult[Any], _run_dml(self.sync_connection, dml, parameters))
        return self.sync_connection.execute(statement, parameters)

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        return self.sync_connection.scalar(statement, parameters)

    async def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(self.sync_connection, *args, **kwargs)

    @contextlib.asynccontextmanager
    async def begin_nested(self) -> AsyncIterator[None]:
        with self.sync_connection.begin_nested():
            yield


# --- prebuilt INSERT/UPDATE/DELETE straight on the driver -----------------------------------
#
# SQLAlchemy's execution of an already compiled statement (cache key, execution context, bind
# processing, result set-up) costs several times what SQLite takes to run it: in the stress
# profile it was the biggest part of these stores' CPU. A prebuilt DML statement (one executed
# a second time) without RETURNING whose every bind comes from the caller's parameters is
# compiled once per set of parameter keys and run on the sqlite3 cursor, with SQLAlchemy's own
# bind processors (dates, booleans, JSON) and its exception classes. Everything else, and
# everything while tracing is on (SQL statements are spans then), goes through SQLAlchemy.


class _Dml(NamedTuple):
    text: str
    values: Callable[[Mapping[str, Any]], tuple[Any, ...]]  # a row's values in bind order
    processors: tuple[tuple[int, Callable[[Any], Any]], ...]  # (position, bind processor)


_NEW: Any = object()
_ONCE: Any = object()
# statement -> {parameter keys: compiled, None when it must go through SQLAlchemy, or _ONCE}
_DML_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], _Dml | None]] = (
    weakref.WeakKeyDictionary()
)


def _dml(statement: Any, parameters: Any, dialect: Any) -> _Dml | None:
    if isinstance(parameters, Mapping):
        first: Mapping[str, Any] = parameters
    elif isinstance(parameters, list) and isinstance(parameters[0], Mapping):
        first = parameters[0]
        keys = first.keys()
        if any(row.keys() != keys for row in parameters):
            return None
    else:
        return None
    key = tuple(first)
    try:
        by_keys = _DML_CACHE.setdefault(statement, {})
    except TypeError:  # not weak-referenceable
        return None
    found = by_keys.get(key, _NEW)
    if found is _NEW:  # a statement built for one call is not worth compiling here
        by_keys[key] = _ONCE
        return None
    if found is _ONCE:  # used again: a prebuilt statement
        found = by_keys[key] = _compile_dml(statement, key, dialect)
    return cast(_Dml | None, found)


def _compile_dml(statement: Any, keys: tuple[str, ...], dialect: Any) -> _Dml | None:
    if getattr(statement, "_returning", None) or getattr(statement, "_return_defaults", False):
        return None
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))
    order = tuple(compiled.positiontup or ())
    if (
        not order
        or not set(order) <= set(keys)  # a bind with a value of its own, or a default
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.literal_execute_params
        or any(bind.expanding for bind in compiled.binds.values())
    ):
        return None
    processors = compiled._bind_processors
    values: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    if len(order) == 1:
        [only] = order

        def values(row: Mapping[str, Any]) -> tuple[Any, ...]:
            return (row[only],)

    else:
        values = operator.itemgetter(*order)
    positions = tuple((i, processors[n]) for i, n in enumerate(order) if processors.get(n))
    return _Dml(str(compiled), values, positions)


class DmlResult:
    """The result of a DML statement run on the driver: SQLAlchemy's has no rows either."""

    def __init__(self, rowcount: int) -> None:
        self.rowcount = rowcount

    def close(self) -> None:
        pass


def _run_dml(conn: Connection, dml: _Dml, parameters: Any) -> DmlResult:
    def bound(row: Mapping[str, Any]) -> tuple[Any, ...] | list[Any]:
        values = dml.values(row)
        if not dml.processors:
            return values
        out = list(values)
        for i, process in dml.processors:
            out[i] = process(out[i])
        return out

    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        if isinstance(parameters, Mapping):
            cursor.execute(dml.text, bound(parameters))
        else:
            cursor.executemany(dml.text, [bound(row) for row in parameters])
        return DmlResult(int(cursor.rowcount))
    except sqlite3.Error as exc:  # as SQLAlchemy raises it: IntegrityError, OperationalError...
        raise DBAPIError.instance(dml.text, None, exc, sqlite3.Error, dialect=conn.dialect) from exc
    finally:
        cursor.close()


# The longest deferred work waits for a transaction to join before one is begun for it (s).
DEFER_MAX_S = 0.25
# ``done`` of deferred work: None once the group holding it is durable, else why it was lost.
DeferredDone = Callable[[BaseException | None], None]
DeferredWork = Callable[["LoopConnection"], Awaitable[Any]]


def apply_pragmas(dbapi_conn: Any, busy_timeout_ms: float) -> None:
    """The settings every Shoal SQLite connection runs with.

    WAL + synchronous=FULL: a commit is fsynced before it is acknowledged, so what a service
    acknowledged survives kill -9 and power loss; readers run beside the single writer.
    """
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class GroupCommitEngine:
    """See the module docstring. ``url`` is a ``sqlite[+driver]:///path`` URL."""

    def __init__(self, url: str, *, readers: int = 4, busy_timeout_ms: int = 30_000) -> None:
        sync_url = make_url(url).set(drivername="sqlite+pysqlite")
        path = sync_url.database or ""
        memory = path in ("", ":memory:")
        if not memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {
            "connect_args": {"timeout": busy_timeout_ms / 1000, "check_same_thread": False}
        }
        if memory:  # one connection, or every reader would see its own empty database
            options["poolclass"] = StaticPool
        else:
            options.update(pool_size=readers + 1, max_overflow=readers)
        self.sync_engine: Engine = sqlalchemy.create_engine(sync_url, **options)

        @event.listens_for(self.sync_engine, "connect")
        def _configure(dbapi_conn: Any, _record: Any) -> None:
            # Transactions are issued explicitly (BEGIN IMMEDIATE / SAVEPOINT / COMMIT): the
            # driver's own implicit BEGIN would break savepoints.
            dbapi_conn.isolation_level = None
            apply_pragmas(dbapi_conn, busy_timeout_ms)

        self._writer: Connection | None = None
        self._in_group = False
        self._lock = asyncio.Lock()
        self._waiting: list[asyncio.Future[None]] = []
        self._committer: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-commit")
        self._closed = False
        self._deferred: list[tuple[DeferredWork, DeferredDone]] = []
        self._deferred_timer: asyncio.TimerHandle | None = None
        self._deferred_flush: asyncio.Task[None] | None = None

    # --- the AsyncEngine subset ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[LoopConnection]:
        """A transaction, durable when the block exits without an exception."""
        if _HOLDING.get() is self:
            raise RuntimeError("nested transaction on the same store (it would wait for itself)")
        if self._closed:
            raise RuntimeError("store closed")
        async with self._lock:
            conn = self._writer_connection()
            # BEGIN and the savepoint go straight to the driver: through SQLAlchemy they cost
            # more CPU than the statements they wrap (profile: ~4% of the devstack).
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            if not self._in_group:
                dbapi.execute("BEGIN IMMEDIATE")
                self._in_group = True
            if self._deferred:
                await self._run_deferred(conn)
            dbapi.execute(_SAVEPOINT)
            token = _HOLDING.set(self)
            try:
                yield LoopConnection(conn)
            except BaseException:
                with contextlib.suppress(Exception):  # gone if SQLite rolled everything back
                    dbapi.execute(_ROLLBACK_TO)
                    dbapi.execute(_RELEASE)
                if not self._waiting:  # nothing else in the group: let go of the write lock
                    _rollback(conn)
                    self._in_group = False
                raise
            else:
                dbapi.execute(_RELEASE)
                durable = self._join_commit()
            finally:
                _HOLDING.reset(token)
        await durable

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[LoopConnection]:
        """Reads of committed data (WAL snapshot per statement)."""
        if self._closed:
            raise RuntimeError("store closed")
        with self.sync_engine.connect() as conn:
            try:
                yield LoopConnection(conn)
            finally:
                conn.rollback()

    def defer(self, work: DeferredWork, done: DeferredDone) -> None:
        """Run ``work`` in the next transaction begun, without a commit of its own (see the
        module docstring); ``done`` is called once it is durable or lost."""
        if self._closed:
            done(RuntimeError("store closed"))
            return
        self._deferred.append((work, done))
        if self._deferred_timer is None:
            loop = asyncio.get_running_loop()
            self._deferred_timer = loop.call_later(DEFER_MAX_S, self._flush_deferred_soon)

    def _flush_deferred_soon(self) -> None:
        self._deferred_timer = None
        if self._deferred and not self._closed:
            self._deferred_flush = asyncio.create_task(self._flush_deferred(), name="sqlite-defer")

    async def _flush_deferred(self) -> None:
        try:
            async with self.begin():
                pass  # begin() runs the deferred work first
        except Exception as exc:  # each work's ``done`` has been told
            log.warning("deferred_write_failed", error=repr(exc))

    async def _run_deferred(self, conn: Connection) -> None:
        """In an open group: the deferred work in one savepoint, durable with the group."""
        batch, self._deferred = self._deferred, []
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        dbapi.execute(_SAVEPOINT)
        try:
            for work, _ in batch:
                await work(LoopConnection(conn))
        except Exception as exc:
            dbapi.execute(_ROLLBACK_TO)
            dbapi.execute(_RELEASE)
            for _, done in batch:
                done(exc)
            return
        dbapi.execute(_RELEASE)
        durable = self._join_commit()

        def tell(fut: asyncio.Future[None]) -> None:
            exc = fut.exception() if not fut.cancelled() else RuntimeError("commit cancelled")
            for _, done in batch:
                done(exc)

        durable.add_done_callback(tell)

    async def dispose(self) -> None:
        if self._deferred_timer is not None:
            self._deferred_timer.cancel()
            self._deferred_timer = None
        if self._deferred_flush is not None:
            with contextlib.suppress(BaseException):
                await self._deferred_flush
        if self._deferred and not self._closed:
            # Committed now rather than lost: deletes of relayed rows that were lost would have
            # those events published again after every restart.
            await self._flush_deferred()
        if self._committer is not None:
            with contextlib.suppress(BaseException):
                await self._committer
        self._closed = True
        lost, self._deferred = self._deferred, []
        for _, done in lost:
            done(RuntimeError("store closed"))
        async with self._lock:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                await asyncio.get_running_loop().run_in_executor(self._thread, _close, writer)
        self._thread.shutdown(wait=True)
        self.sync_engine.dispose()

    # --- group commit -----------------------------------------------------------------------

    def _writer_connection(self) -> Connection:
        if self._writer is None:
            self._writer = self.sync_engine.connect()
        return self._writer

    def _join_commit(self) -> asyncio.Future[None]:
        """A future resolved once the open group is durable (or failed)."""
        durable: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(durable)
        self._start_committer()
        return durable

    def _start_committer(self) -> None:
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_groups(), name="sqlite-commit")

    async def _commit_groups(self) -> None:
        loop = asyncio.get_running_loop()
        # One trip through the loop before the first group closes: work the same step made
        # ready joins it instead of waiting a whole commit for the next one. On a compute node
        # that is a quick run's outcome, queued with its accepted row (stress, c=10: 1.57 ->
        # 1.24 commits per job; ADR 0022). Idle, the trip costs microseconds.
        await asyncio.sleep(0)
        while self._waiting:
            # Transactions queued on the lock while the last commit was on disk run first
            # (asyncio.Lock is FIFO), so they join this group.
            async with self._lock:
                group, self._waiting = self._waiting, []
                conn = self._writer
                self._in_group = False
                if not group or conn is None:
                    continue
                try:
                    # shield: a cancelled service still finishes (or fails) the fsync in flight.
                    await asyncio.shield(loop.run_in_executor(self._thread, _commit, conn))
                except BaseException as exc:
                    await asyncio.shield(loop.run_in_executor(self._thread, _rollback, conn))
                    for waiter in group:
                        if not waiter.done():
                            waiter.set_exception(
                                exc if isinstance(exc, Exception) else RuntimeError(repr(exc))
                            )
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for waiter in group:
                    if not waiter.done():
                        waiter.set_result(None)


# Each caller's work in a group is one savepoint: a failure rolls back only that caller's.
_SAVEPOINT = "SAVEPOINT shoal_group_member"
_ROLLBACK_TO = "ROLLBACK TO shoal_group_member"
_RELEASE = "RELEASE shoal_group_member"


def _commit(conn: Connection) -> None:
    # COMMIT as SQL, not the driver's commit(): that is a silent no-op when SQLite has already
    # rolled the transaction back (I/O error), and the group would be reported durable.
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    dbapi.execute("COMMIT")
    conn.commit()  # SQLAlchemy's own bookkeeping; the driver has no transaction left


def _rollback(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.exec_driver_sql("ROLLBACK")
    with contextlib.suppress(Exception):
        conn.rollback()


def _close(conn: Connection) -> None:
    _rollback(conn)
    conn.close()
