"""Test-only fault points: kill the process, or fail a kernel request, at a chosen step.

Read once from the environment (tests/crashlab.py sets it; nothing else should):

* ``FDBHOOK_CRASH_AT=kernel:K`` - SIGKILL right after the K-th kernel write
  request has been sent (and handled: rtnetlink runs in the sender's call);
  ``file:K`` - right after the K-th durable state-file change (a write or a
  removal) is done.
* ``FDBHOOK_FAULT_AT=kernel:K:ERRNO`` - the K-th kernel write request is not
  sent; the adapter sees ERRNO as the kernel's answer to it (EINVAL, EBUSY,
  ENOBUFS, or a number).

Counting lives in the two places that change things: the kernel adapter's one
write path and the state store's one write path. A malformed value arms
nothing and never raises. Unset, each hook point costs one attribute test.
"""

import errno
import os
import signal

ARMED = False  # True once a well-formed value was read
_crash = None  # (kind, k)
_fault = None  # (k, errno)
_counts = {"kernel": 0, "file": 0}
_read = False


def _parse_crash(value):
    kind, _, k = (value or "").partition(":")
    if kind in ("kernel", "file") and k.isdigit() and int(k) > 0:
        return kind, int(k)
    return None


def _parse_fault(value):
    parts = (value or "").split(":")
    if len(parts) != 3 or parts[0] != "kernel" or not parts[1].isdigit() or int(parts[1]) < 1:
        return None
    code = parts[2]
    if code.isdigit():
        number = int(code)
    else:
        number = getattr(errno, code.upper(), None)
    if not isinstance(number, int) or number <= 0:
        return None
    return int(parts[1]), number


def load(env=None):
    """(Re)read the environment and reset the counters (a forked test child calls it again)."""
    global ARMED, _crash, _fault, _read
    env = os.environ if env is None else env
    _crash = _parse_crash(env.get("FDBHOOK_CRASH_AT"))
    _fault = _parse_fault(env.get("FDBHOOK_FAULT_AT"))
    _counts["kernel"] = _counts["file"] = 0
    ARMED = _crash is not None or _fault is not None
    _read = True
    return ARMED


def armed():
    if not _read:
        load()
    return ARMED


def counts():
    return dict(_counts)


def kernel_request():
    """Count one kernel write request about to be sent: (fail errno or 0, crash after sending it?)."""
    _counts["kernel"] += 1
    n = _counts["kernel"]
    code = _fault[1] if _fault is not None and _fault[0] == n else 0
    return code, _crash == ("kernel", n)


def file_done():
    """Count one durable state-file change; SIGKILL here if it is the chosen one."""
    _counts["file"] += 1
    if _crash == ("file", _counts["file"]):
        crash()


def crash():
    os.kill(os.getpid(), signal.SIGKILL)
