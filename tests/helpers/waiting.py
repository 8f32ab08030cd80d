"""Polling: wait until a condition holds, up to a deadline, then fail naming what never
came. The deadline only bounds the wait; a test never sleeps a fixed time instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    what: str,
    timeout: float = 120.0,
    interval: float = 0.2,
    explain: Callable[[], str] | None = None,
) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy, and
    return that. After ``timeout`` seconds the test fails naming ``what``, followed by
    ``explain()`` when given (a log tail, say). An exception from ``condition`` (an assert
    that the awaited process still runs) ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f":\n{explain()}" if explain is not None else ""
            pytest.fail(f"gave up waiting for {what} after {timeout:g} s{detail}")
        time.sleep(interval)
