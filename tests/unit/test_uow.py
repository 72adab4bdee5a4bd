"""UnitOfWork's mapping of a lost database (the session is a fake port)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from edgefleet.controlplane.db.uow import UnitOfWork
from edgefleet.controlplane.errors import Unavailable


class DeadConnection:
    """A session whose close() meets a connection the server dropped."""

    def close(self) -> None:
        raise OperationalError("ROLLBACK", {}, Exception("server closed the connection"))


def _uow() -> UnitOfWork:
    return UnitOfWork(cast(Session, DeadConnection()))


def test_work_done_before_the_connection_died_stands() -> None:
    with _uow():
        result = 42
    assert result == 42


def test_a_query_on_a_lost_database_is_unavailable_even_if_close_fails_too() -> None:
    with pytest.raises(Unavailable, match="try again"), _uow():
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_other_errors_pass_through() -> None:
    with pytest.raises(KeyError), _uow():
        cast(dict[str, Any], {})["missing"]
