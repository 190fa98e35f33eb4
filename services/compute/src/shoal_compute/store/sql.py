"""The compute node's store on SQLAlchemy async: SQLite (embedded default) or Postgres."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Row, bindparam, insert, literal_column, select, update
from sqlalchemy.exc import IntegrityError

from shoal_common.db import (
    StoreConnection,
    StoreEngine,
    add_to_outbox,
    create_store_engine,
    run_migrations,
)
from shoal_common.direct_relay import DirectOutboxRelay
from shoal_common.errors import Conflict, InvalidTransition, NotFound
from shoal_common.events import Envelope, Event
from shoal_common.protocol import Capacity
from shoal_common.spec import RunOutput
from shoal_common.sqlite_store import GroupCommitEngine
from shoal_compute.domain.execution import ExecutionRecord, LocalState
from shoal_compute.executors.base import RunFiles
from shoal_compute.store.base import PublishFn, Relay
from shoal_compute.store.tables import executions, outbox

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"

_CHANGEABLE = {"result_cid", "error", "run_output", "result_files"}


def _row_to_record(row: Row[Any]) -> ExecutionRecord:
    return ExecutionRecord(
        id=row.id,
        job_id=row.job_id,
        job=orjson.loads(row.job),
        state=LocalState(row.state),
        version=row.version,
        requester_id=row.requester_id,
        resources=Capacity.model_validate(orjson.loads(row.resources)),
        result_cid=row.result_cid,
        error=row.error,
        run_output=RunOutput.model_validate(orjson.loads(row.run_output))
        if row.run_output
        else None,
        result_files=RunFiles.decode(row.result_files) if row.result_files else None,
        created=row.created,
        updated=row.updated,
    )


def _dump_run_output(value: RunOutput | None) -> bytes | None:
    return orjson.dumps(value.model_dump(mode="json", by_alias=True)) if value else None


# Built once: constructing a statement per call cost more than running it (stress profile).
_INSERT_EXECUTION = insert(executions)
_SELECT_EXECUTION = select(executions).where(executions.c.id == bindparam("b_id"))


@functools.cache
def _transition(expected: int) -> Any:
    """The compare-and-set update from any of ``expected`` states (binds ``b_e0``...); the
    columns to change come with the parameters.

    A fixed list of binds and no RETURNING: so on SQLite it runs on the driver (the group-commit
    engine's DML path) instead of through SQLAlchemy's execution, which with the row read back
    was ~10% of the compute process under load (ADR 0024)."""
    return (
        update(executions)
        .where(
            executions.c.id == bindparam("b_id"),
            executions.c.state.in_([bindparam(f"b_e{i}") for i in range(expected)]),
        )
        # The 1 inline: a bound constant would keep it off the driver path.
        .values(version=executions.c.version + literal_column("1"))
    )


class SqlExecutionStore:
    """:class:`ExecutionStore` over one database; migrations applied by :meth:`start`."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._engine: StoreEngine | None = None
        self._relay: DirectOutboxRelay | None = None

    @property
    def engine(self) -> StoreEngine:
        if self._engine is None:
            raise RuntimeError("store not started")
        return self._engine

    async def start(self) -> None:
        # Alembic is synchronous (and runs its own loop); keep it off ours.
        await asyncio.to_thread(run_migrations, self._url, MIGRATIONS)
        self._engine = create_store_engine(self._url)

    async def close(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def create(
        self,
        record: ExecutionRecord,
        *,
        events: Sequence[Event] = (),
        on_ordered: Callable[[], None] | None = None,
    ) -> None:
        values = {
            "id": record.id,
            "job_id": record.job_id,
            "state": record.state.value,
            "version": record.version,
            "requester_id": record.requester_id,
            "job": orjson.dumps(record.job),
            "resources": orjson.dumps(record.resources.model_dump()),
            "run_output": _dump_run_output(record.run_output),
            "result_cid": record.result_cid,
            "result_files": record.result_files.encode() if record.result_files else None,
            "error": record.error,
            "created": record.created,
            "updated": record.updated,
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(_INSERT_EXECUTION, values)
                staged = await add_to_outbox(conn, outbox, *events)
                if on_ordered is not None and isinstance(self.engine, GroupCommitEngine):
                    # The group's writer lock is held until this block ends: a transition
                    # of the row started now runs after it, in this group or a later one.
                    # Its result then commits with the row (one fsync, ADR 0018).
                    on_ordered()
                    on_ordered = None
        except IntegrityError as exc:
            raise Conflict(f"execution {record.id} already exists") from exc
        if on_ordered is not None:
            on_ordered()
        self._handoff(staged)

    async def find(self, execution_id: str) -> ExecutionRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_SELECT_EXECUTION, {"b_id": execution_id})).first()
        return _row_to_record(row) if row is not None else None

    async def get(self, execution_id: str) -> ExecutionRecord:
        record = await self.find(execution_id)
        if record is None:
            raise NotFound(f"execution {execution_id} is not known on this node")
        return record

    async def transition(
        self,
        execution_id: str,
        *,
        expected: Collection[LocalState],
        new: LocalState,
        events: Sequence[Event] = (),
        **changes: Any,
    ) -> None:
        unknown = set(changes) - _CHANGEABLE
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}")
        states = [s.value for s in expected]
        values: dict[str, Any] = {
            "b_id": execution_id,
            **{f"b_e{i}": state for i, state in enumerate(states)},
            "state": new.value,
            "updated": time.time(),
        }
        if "run_output" in changes:
            values["run_output"] = _dump_run_output(changes["run_output"])
        if changes.get("result_files") is not None:
            values["result_files"] = changes["result_files"].encode()
        for key in ("result_cid", "error"):
            if key in changes:
                values[key] = changes[key]
        async with self.engine.begin() as conn:
            moved = (await conn.execute(_transition(len(states)), values)).rowcount
            if not moved:
                await self._explain_miss(conn, execution_id, expected, new)
            staged = await add_to_outbox(conn, outbox, *events)
        self._handoff(staged)

    async def _explain_miss(
        self,
        conn: StoreConnection,
        execution_id: str,
        expected: Collection[LocalState],
        new: LocalState,
    ) -> None:
        current = (
            await conn.execute(select(executions.c.state).where(executions.c.id == execution_id))
        ).scalar()
        if current is None:
            raise NotFound(f"execution {execution_id} is not known on this node")
        raise InvalidTransition(
            f"execution {execution_id} is {current}, not "
            f"{'/'.join(sorted(s.value for s in expected))}; cannot move it to {new.value}"
        )

    async def find_by_result(self, result_cid: str) -> ExecutionRecord | None:
        query = select(executions).where(executions.c.result_cid == result_cid).limit(1)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _row_to_record(row) if row is not None else None

    async def list_executions(
        self,
        *,
        states: Collection[LocalState] | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[ExecutionRecord]:
        order = executions.c.created.desc() if newest_first else executions.c.created
        query = select(executions).order_by(order).limit(limit)
        if states is not None:
            query = query.where(executions.c.state.in_([s.value for s in states]))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_row_to_record(r) for r in rows]

    async def stage_events(self, *events: Event) -> None:
        async with self.engine.begin() as conn:
            staged = await add_to_outbox(conn, outbox, *events)
        self._handoff(staged)

    def relay(self, publish: PublishFn, *, service: str) -> Relay:
        self._relay = DirectOutboxRelay(self.engine, outbox, publish, service=service)
        return self._relay

    def _handoff(self, envelopes: list[Envelope]) -> None:
        """After a commit: the relay publishes what was just staged, without reading it back."""
        if self._relay is not None and envelopes:
            self._relay.handoff(envelopes)
