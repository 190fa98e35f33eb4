"""Which database errors count as "unavailable, try again later" (DATABASE_UNAVAILABLE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc

from shoal_common.db import DATABASE_UNAVAILABLE, _connection_lost_is_unavailable


class _ServerSaid(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"server said {sqlstate}")
        self.sqlstate = sqlstate


@dataclass
class _Context:
    """The parts of SQLAlchemy's ExceptionContext the hook reads."""

    original_exception: BaseException
    sqlalchemy_exception: sa_exc.StatementError | None
    is_disconnect: bool = False


def _context(orig: BaseException, *, is_disconnect: bool = False, cls: Any = None) -> _Context:
    wrapped = (cls or sa_exc.DBAPIError)("SELECT 1", {}, orig)
    return _Context(orig, wrapped, is_disconnect)


@pytest.mark.parametrize("sqlstate", ["57P01", "57P03", "08006"])
def test_a_server_going_or_coming_is_unavailable(sqlstate: str) -> None:
    raised = _connection_lost_is_unavailable(_context(_ServerSaid(sqlstate)))
    assert isinstance(raised, DATABASE_UNAVAILABLE)
    assert raised.statement == "SELECT 1"


def test_a_dropped_connection_is_unavailable() -> None:
    orig = Exception("connection was closed in the middle of operation")
    raised = _connection_lost_is_unavailable(_context(orig, is_disconnect=True))
    assert isinstance(raised, DATABASE_UNAVAILABLE)


@pytest.mark.parametrize("sqlstate", ["23505", "42P01", "40001", ""])
def test_a_wrong_statement_is_not_unavailable(sqlstate: str) -> None:
    # Constraint violations, missing tables and serialisation failures stay what they are.
    assert _connection_lost_is_unavailable(_context(_ServerSaid(sqlstate))) is None


def test_an_error_already_unavailable_is_left_alone() -> None:
    context = _context(_ServerSaid("57P01"), cls=sa_exc.OperationalError)
    assert _connection_lost_is_unavailable(context) is None
