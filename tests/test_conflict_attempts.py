"""conflict_attempts: the statements the server aborts to break a deadlock run again."""

from __future__ import annotations

import psycopg
import pytest

from listener.cluster.database import conflict_attempts


def run(failures: list[BaseException | None], retries: int = 3) -> int:
    """Run work that raises each of ``failures`` in turn (None: it succeeds); return how
    many tries it took."""
    tries = 0
    for attempt in conflict_attempts(retries):
        with attempt:
            tries += 1
            failure = failures[tries - 1]
            if failure is not None:
                raise failure
    return tries


def test_a_deadlock_or_a_serialization_failure_runs_the_work_again_until_it_succeeds() -> None:
    deadlock, conflict = psycopg.errors.DeadlockDetected(), psycopg.errors.SerializationFailure()
    assert run([None]) == 1
    assert run([deadlock, conflict, None]) == 3


def test_the_last_try_s_conflict_is_raised() -> None:
    with pytest.raises(psycopg.errors.DeadlockDetected):
        run([psycopg.errors.DeadlockDetected() for _ in range(3)], retries=2)


def test_any_other_error_is_raised_at_once() -> None:
    dropped = psycopg.OperationalError("server closed the connection")
    with pytest.raises(psycopg.OperationalError):
        run([dropped, None])
