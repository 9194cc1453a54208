"""The capture spool: every hook invocation saved for ``fdbhook replay``."""

import base64
import json
import logging
import os
import time

from fdbhook.errors import UsageError

LOG = logging.getLogger(__name__)


def capture(config, driver, argv, data):
    """Save one invocation (argv + stdin) to the spool for ``fdbhook replay``.

    The spool is bounded: the oldest files go once it exceeds
    ``capture_max_bytes``. A capture failure never fails the hook.
    """
    try:
        os.makedirs(config.capture_dir, mode=0o700, exist_ok=True)
        stamp = "%.6f" % time.time()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(argv[:2]))[:80]
        path = os.path.join(config.capture_dir, "%s-%d-%s-%s.json" % (stamp, os.getpid(), driver, safe))
        record = {"time": float(stamp), "driver": driver, "argv": list(argv)}
        try:
            record["stdin"] = data.decode("utf-8")
        except UnicodeDecodeError:
            record["stdin_b64"] = base64.b64encode(data).decode()
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.rename(tmp, path)
        _trim_spool(config.capture_dir, config.capture_max_bytes)
    except OSError as exc:
        LOG.warning("capture to %s failed: %s", config.capture_dir, exc)


def _trim_spool(directory, limit):
    entries = []
    for name in os.listdir(directory):
        if name.endswith(".json"):
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            entries.append((name, st.st_size))
    entries.sort()
    total = sum(size for _, size in entries)
    for name, size in entries:
        if total <= limit:
            break
        try:
            os.unlink(os.path.join(directory, name))
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
