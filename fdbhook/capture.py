"""The capture spool: every hook invocation saved for ``fdbhook replay``."""

import base64
import json
import logging
import os
import time

from fdbhook import safefile
from fdbhook.errors import UsageError

LOG = logging.getLogger(__name__)


def capture(config, driver, argv, data):
    """Save one invocation (argv + stdin) to the spool for ``fdbhook replay``.

    The spool is bounded: the oldest files go once it exceeds
    ``capture_max_bytes``. It holds domain XML (passwords included), so it
    must be root's own directory, writable by nobody else, reached without
    a symlink (fdbhook.safefile); files are 0600. A capture failure never
    fails the hook.
    """
    try:
        dir_fd = safefile.open_dir(config.capture_dir, create=True, mode=0o700)
    except OSError as exc:
        LOG.warning("capture to %s refused: %s", config.capture_dir, exc)
        return
    try:
        stamp = "%.6f" % time.time()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(argv[:2]))[:80]
        name = "%s-%d-%s-%s.json" % (stamp, os.getpid(), driver, safe)
        record = {"time": float(stamp), "driver": driver, "argv": list(argv)}
        try:
            record["stdin"] = data.decode("utf-8")
        except UnicodeDecodeError:
            record["stdin_b64"] = base64.b64encode(data).decode()
        safefile.write_at(dir_fd, name, json.dumps(record).encode(), mode=0o600, fsync=False)
        _trim_spool(dir_fd, config.capture_max_bytes)
    except OSError as exc:
        LOG.warning("capture to %s failed: %s", config.capture_dir, exc)
    finally:
        os.close(dir_fd)


def _trim_spool(dir_fd, limit):
    """Oldest captures out until the spool fits; regular files only, unlinked relative to the verified fd."""
    entries = sorted((name, st.st_size) for name, st in safefile.listing(dir_fd) if name.endswith(".json"))
    total = sum(size for _, size in entries)
    for name, size in entries:
        if total <= limit:
            break
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass
        total -= size


def load(path):
    """(driver, argv, stdin bytes) of a capture file; UsageError if it is not one."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        driver, argv = record["driver"], list(record["argv"])
        data = (base64.b64decode(record["stdin_b64"]) if "stdin_b64" in record
                else record.get("stdin", "").encode("utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(reason="%s: not a capture file: %s" % (path, exc)) from None
    return driver, argv, data
