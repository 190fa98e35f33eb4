"""Datastore plumbing shared by every service: engines, migrations, the transactional outbox.

Each service owns its tables and its Alembic migrations; this module only knows how to open a
database (SQLite embedded, Postgres in production) durably, run a service's migrations, and relay
events that were committed in the same transaction as the state change they describe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    event,
    insert,
    select,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from shoal_common import telemetry
from shoal_common.events import Envelope, Event
from shoal_common.sqlite_store import GroupCommitEngine, LoopConnection, apply_pragmas

# What a store runs on: SQLite through the group-commit engine, Postgres through asyncpg. Both
# offer begin()/connect() and connections with execute()/begin_nested()/run_sync().
StoreEngine = AsyncEngine | GroupCommitEngine
StoreConnection = AsyncConnection | LoopConnection

log = structlog.get_logger(__name__)

# "The database cannot be reached right now" (Postgres restarting, a dropped connection, SQLite
# busy): the operation did nothing durable and may be tried again later.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError,
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_metadata() -> MetaData:
    return MetaData(naming_convention=NAMING_CONVENTION)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def normalise_url(url: str) -> str:
    """Accept plain ``postgresql://`` / ``sqlite:///`` URLs and pick the async driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        return "postgresql+asyncpg://" + url[len("postgresql://") :]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///") :]
    return url


def is_sqlite(url: str) -> bool:
    return make_url(normalise_url(url)).get_backend_name() == "sqlite"


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine tuned for durability: a committed transaction is on disk."""
    url = normalise_url(url)
    if is_sqlite(url):
        path = make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            apply_pragmas(dbapi_conn, 30_000)

        return engine
    engine = create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
    )
    event.listen(engine.sync_engine, "handle_error", _connection_lost_is_unavailable, retval=True)
    return engine


# Server messages (SQLSTATE class 57, and 08 at connect) that mean "not now", not "wrong".
_UNAVAILABLE_SQLSTATES = ("08", "57P")


def _connection_lost_is_unavailable(context: Any) -> BaseException | None:
    """Raise a lost connection as :class:`OperationalError`, one of ``DATABASE_UNAVAILABLE``.

    asyncpg reports a connection dropped mid-query ("connection was closed in the middle of
    operation"), a server shutting down (57P01) or still starting up (57P03) as a plain
    ``DBAPIError``. Callers that retry while the database is away caught none of them, so a job
    placement that met a Postgres restart was given up and waited for the stuck-job sweep.
    """
    error = context.sqlalchemy_exception
    if error is None or isinstance(error, DATABASE_UNAVAILABLE):
        return None
    sqlstate = str(getattr(context.original_exception, "sqlstate", "") or "")
    if not (context.is_disconnect or sqlstate.startswith(_UNAVAILABLE_SQLSTATES)):
        return None
    return sa_exc.OperationalError(
        error.statement,
        error.params,
        context.original_exception,
        connection_invalidated=error.connection_invalidated,
    )


def create_store_engine(url: str, *, pool_size: int = 10) -> StoreEngine:
    """The engine for a service's own store: see :mod:`shoal_common.sqlite_store` for SQLite."""
    url = normalise_url(url)
    if is_sqlite(url):
        return GroupCommitEngine(url)
    return create_engine(url, pool_size=pool_size)


def run_migrations(url: str, script_location: Path, *, revision: str = "head") -> None:
    """Upgrade a service's database to ``revision`` (sync; call via ``asyncio.to_thread``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    command.upgrade(cfg, revision)


def run_alembic_env(target_metadata: MetaData) -> None:
    """The body of every service's ``migrations/env.py`` (online mode, async engine)."""
    from alembic import context

    config = context.config
    url = config.get_main_option("sqlalchemy.url") or ""

    def do_run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=is_sqlite(url),  # SQLite can only ALTER via table copies
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    existing = config.attributes.get("connection")
    if existing is not None:
        do_run(existing)
        return

    async def run_async() -> None:
        engine = create_engine(url)
        async with engine.connect() as conn:
            await conn.run_sync(do_run)
        await engine.dispose()

    asyncio.run(run_async())


# --- outbox --------------------------------------------------------------------------------------


def outbox_table(metadata: MetaData) -> Table:
    """Events waiting to be relayed; written in the same transaction as the state change."""
    return Table(
        "outbox",
        metadata,
        Column(
            "seq",
            BigInteger().with_variant(Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("envelope", LargeBinary, nullable=False),
        Column("created", Float, nullable=False),
    )


# Statements built once per table: building and cache-keying a SQLAlchemy statement on every
# call cost more than running it (stress profile).
@functools.cache
def _insert(table: Table) -> Any:
    return insert(table)


@functools.cache
def _insert_if_new(table: Table, dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING, in the dialect's own syntax."""
    dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return dialect_insert(table).on_conflict_do_nothing()


def _dialect(conn: StoreConnection) -> str:
    return str(conn.sync_connection.dialect.name) if conn.sync_connection else ""


async def add_to_outbox(conn: StoreConnection, outbox: Table, *events: Event) -> list[Envelope]:
    """Stage events inside the caller's transaction; the relay publishes them after commit."""
    envelopes = [Envelope.wrap(e) for e in events]
    if envelopes:
        now = time.time()
        await conn.execute(
            _insert(outbox),
            [{"event_id": e.id, "envelope": e.to_bytes(), "created": now} for e in envelopes],
        )
    return envelopes


# An outbox relay with nothing to do waits for a commit's notify(); it still looks at the table
# this often in case a notify was missed (ADR 0013).
IDLE_POLL_INTERVAL_S = 30.0


class OutboxRelay:
    """Publishes committed outbox rows to the bus, then deletes them.

    Wake it with :meth:`notify` right after a commit for low latency; it also polls, so events
    committed just before a crash go out on the next start. Publishing is at-least-once; the
    envelope id makes duplicates harmless downstream.
    """

    def __init__(
        self,
        engine: StoreEngine,
        outbox: Table,
        publish: Callable[[Envelope], Awaitable[None]],
        *,
        service: str,
        poll_interval: float = 1.0,
        idle_poll_interval: float = IDLE_POLL_INTERVAL_S,
        batch: int = 500,
        delete_rows: Callable[[list[int]], Awaitable[None]] | None = None,
    ) -> None:
        """``delete_rows`` hands relayed rows (by seq) to a store that deletes them with its
        own next write (the requester on SQLite: one writer per file); until they are gone,
        they are not relayed again. By default they are deleted here, on ``engine``."""
        self._engine = engine
        self._delete_rows = delete_rows
        # seq -> envelope of rows handed to delete_rows and perhaps not deleted yet. The
        # envelope tells a new row that reused a deleted row's seq (SQLite reuses the largest
        # rowid once it is deleted) from the old one.
        self._deleting: dict[int, bytes] = {}
        self._outbox = outbox
        self._publish = publish
        self._service = service
        self._poll_interval = poll_interval
        self._idle_poll_interval = max(idle_poll_interval, poll_interval)
        self._batch = batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Built once; the delete runs once per row (executemany) instead of an IN list compiled
        # per call. Not a range on seq: on Postgres a lower seq can commit after a higher one.
        self._select_rows = (
            select(outbox.c.seq, outbox.c.envelope, outbox.c.created)
            .order_by(outbox.c.seq)
            .limit(batch)
        )
        self._delete_seq = delete(outbox).where(outbox.c.seq == bindparam("b_seq"))
        self._lag = telemetry.OUTBOX_LAG.labels(service=service)

    def notify(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self._service}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # The first pass at once (what a previous run left); then woken by notify() after each
        # commit, polling every poll_interval while rows were found or relaying failed, and
        # only every idle_poll_interval once the outbox is empty (ADR 0013).
        interval = 0.0
        while True:
            if interval:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Python 3.11's wait_for drops a cancel that races the wake-up (a notify()
                # just before stop()); without this the relay would never stop.
                raise asyncio.CancelledError
            self._wake.clear()
            try:
                relayed = await self.relay_once()
                while relayed >= self._batch:
                    relayed = await self.relay_once()
                interval = self._poll_interval if relayed else self._idle_poll_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox_relay_failed", service=self._service, error=repr(exc))
                await asyncio.sleep(0.5)
                interval = self._poll_interval

    async def relay_once(self) -> int:
        """Publish up to one batch; returns how many rows were relayed."""
        async with self._engine.connect() as conn:
            rows: Sequence[Any] = (await conn.execute(self._select_rows)).all()
        if self._deleting:
            # Handed to delete_rows and not deleted yet: skip them. Those no longer here are
            # gone for good.
            pending = {r.seq for r in rows if self._deleting.get(r.seq) == r.envelope}
            self._deleting = {seq: self._deleting[seq] for seq in pending}
            rows = [r for r in rows if r.seq not in pending]
        if not rows:
            return 0
        envelopes = [Envelope.from_bytes(r.envelope) for r in rows]
        await asyncio.gather(*(self._publish(e) for e in envelopes))
        now = time.time()
        for r in rows:
            self._lag.observe(max(0.0, now - r.created))
        if self._delete_rows is not None:
            self._deleting.update((r.seq, r.envelope) for r in rows)
            await self._delete_rows([r.seq for r in rows])
            return len(rows)
        async with self._engine.begin() as conn:
            await conn.execute(self._delete_seq, [{"b_seq": r.seq} for r in rows])
        return len(rows)


# --- consumer de-duplication ---------------------------------------------------------------------


def processed_events_table(metadata: MetaData) -> Table:
    """Ids of events a consumer has applied, so redeliveries change nothing."""
    return Table(
        "processed_events",
        metadata,
        Column("event_id", String(64), primary_key=True),
        Column("processed", Float, nullable=False),
    )


async def mark_processed(conn: StoreConnection, table: Table, event_id: str) -> bool:
    """Record ``event_id`` in the caller's transaction; False if it was already applied."""
    result = await conn.execute(
        _insert_if_new(table, _dialect(conn)),
        {"event_id": event_id, "processed": time.time()},
    )
    return bool(result.rowcount == 1)
