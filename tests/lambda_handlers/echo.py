"""Tiny Lambda handlers for the local AWS stack's tests (see tests/test_localaws.py).

They run inside the real runtime client (awslambdaric) under the Runtime Interface
Emulator, so they show what a deployed function would see: one process per warm
container, a cold first call, exceptions and timeouts.
"""

from __future__ import annotations

import os
import signal
import time

_COLD = True


def echo(event, context):
    """Return the event with this runtime's pid and whether this call was its first."""
    global _COLD
    cold, _COLD = _COLD, False
    return {
        "event": event,
        "pid": os.getpid(),
        "cold": cold,
        "request_id": context.aws_request_id,
        "tmpdir": os.environ.get("TMPDIR", ""),
    }


def crash(event, context):
    """Raise ``ValueError`` for ``{"crash": true}``; echo other events.

    ``{"kill_rie": true}`` kills the emulator that runs this runtime (its parent), as
    if the execution environment died in the middle of an invocation.
    """
    if isinstance(event, dict) and event.get("crash"):
        raise ValueError(f"asked to crash: {event!r}")
    if isinstance(event, dict) and event.get("kill_rie"):
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(10)
    return echo(event, context)


def sleep(event, context):
    """Sleep ``event["sleep"]`` seconds, then echo."""
    time.sleep(float(event.get("sleep", 0)))
    return echo(event, context)


def noop(event, context):
    """Do nothing; the benchmark's handler."""
    return {}
