"""Records of what fdbhook applied, under the state directory.

stopped/release hooks get XML without port or bridge names, so teardown works
from these records. One JSON file per domain (``domains/DRIVER-NAME.json``),
written atomically (temp file, fsync, rename); one lock file serialises every
read-modify-write, so concurrent hooks for different domains on one bridge
never lose an update.
"""

import dataclasses
import fcntl
import json
import os
from contextlib import contextmanager

from fdbhook import faults, safefile
from fdbhook.errors import StateError
from fdbhook.model import DomainRecord, NicRecord

FORMAT = 1


def record_to_json(record):
    return {
        "format": FORMAT,
        "driver": record.driver,
        "domain": record.domain,
        "uuid": record.uuid,
        "paused": record.paused,
        "nics": [dataclasses.asdict(nic) for nic in record.nics],
    }


def _nic_from_json(nic):
    fields = {f.name for f in dataclasses.fields(NicRecord)}
    values = {k: v for k, v in nic.items() if k in fields}
    # JSON has no tuples; the records compare equal only with them.
    values["vids"] = tuple(values.get("vids") or ())
    for key in ("prev_vlans", "set_vlans"):
        if values.get(key) is not None:
            values[key] = tuple(tuple(m) for m in values[key])
    return NicRecord(**values)


def record_from_json(data):
    nics = tuple(_nic_from_json(nic) for nic in data.get("nics", ()))
    return DomainRecord(driver=data["driver"], domain=data["domain"], uuid=data.get("uuid"), nics=nics,
                        paused=bool(data.get("paused", False)))


def _safe_name(name):
    # Domain names may hold almost anything; keep the file name tame and
    # unambiguous.
    out = []
    for ch in name:
        if ch.isalnum() or ch in "-_.":
            out.append(ch)
        else:
            out.append("%%%02x" % ord(ch))
    safe = "".join(out)
    return "%2e" + safe[1:] if safe.startswith(".") else safe


def _atomic_write(path, data):
    """Write ``data`` to ``path`` so readers see the old or the new file, never half; durable on return.

    The one write path of the state directory, through fdbhook.safefile: the
    directory verified (root's, no symlink on the way), an O_EXCL temp file
    with a random name, fsync, rename, fsync of the directory. fdbhook.faults
    counts here.
    """
    try:
        safefile.write_file(path, data, mode=0o600, dir_mode=0o700)
    except OSError as exc:
        raise StateError(path=path, reason=_why(exc)) from None
    if faults.armed():
        faults.file_done()


def _why(exc):
    return exc.reason if isinstance(exc, safefile.UnsafePath) else (exc.strerror or str(exc))


def _ensure_dir(path):
    try:
        safefile.ensure_dir(path, 0o700)
    except OSError as exc:
        raise StateError(path=getattr(exc, "path", None) or path, reason=_why(exc)) from None


def _unlink(path):
    """Remove a state file (missing is fine); counted like a write. StateError on failure."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateError(path=path, reason=exc.strerror or str(exc)) from None
    if faults.armed():
        faults.file_done()


def clean_temp_files(directory):
    """Remove ``.tmp-*`` files a killed writer left behind (call with the store's lock held)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if name.startswith(".tmp-"):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass
    return removed


class Store:
    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.domain_dir = os.path.join(state_dir, "domains")

    def _ensure(self):
        _ensure_dir(self.domain_dir)

    @contextmanager
    def lock(self):
        """Hold the store's exclusive lock (blocks until it is free)."""
        self._ensure()
        path = os.path.join(self.state_dir, "lock")
        try:
            dir_fd = safefile.open_dir(self.state_dir)
            try:
                fd = safefile.open_at(dir_fd, "lock", os.O_RDWR | os.O_CREAT, 0o600)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(path=path, reason=_why(exc)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)

    def path(self, driver, domain):
        return os.path.join(self.domain_dir, "%s-%s.json" % (driver, _safe_name(domain)))

    def load(self, driver, domain):
        path = self.path(driver, domain)
        try:
            with open(path, encoding="utf-8") as handle:
                return record_from_json(json.load(handle))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(path=path, reason="unreadable record: %s" % exc) from None

    def save(self, record):
        """Write (or, with no NICs left, remove) a domain's record atomically."""
        path = self.path(record.driver, record.domain)
        if not record.nics:
            self.remove(record.driver, record.domain)
            return
        self._ensure()
        _atomic_write(path, json.dumps(record_to_json(record), indent=1, sort_keys=True).encode())

    def remove(self, driver, domain):
        _unlink(self.path(driver, domain))

    # --- intents: one domain operation's plan, written before its first kernel write ----
    def intent_dir(self):
        return os.path.join(self.state_dir, "intents")

    def intent_path(self, driver, domain):
        return os.path.join(self.intent_dir(), "%s-%s.json" % (driver, _safe_name(domain)))

    def save_intent(self, driver, domain, data):
        path = self.intent_path(driver, domain)
        _ensure_dir(self.intent_dir())
        _atomic_write(path, json.dumps(data, sort_keys=True).encode())

    def remove_intent(self, driver, domain):
        _unlink(self.intent_path(driver, domain))

    def intents(self):
        """[(path, parsed JSON or None if unreadable)] of every intent left, sorted."""
        try:
            names = sorted(n for n in os.listdir(self.intent_dir()) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(path=self.intent_dir(), reason=exc.strerror) from None
        out = []
        for name in names:
            path = os.path.join(self.intent_dir(), name)
            try:
                with open(path, encoding="utf-8") as handle:
                    out.append((path, json.load(handle)))
            except (OSError, ValueError, RecursionError):
                out.append((path, None))
        return out

    def has_intents(self):
        try:
            return any(n.endswith(".json") for n in os.listdir(self.intent_dir()))
        except OSError:
            return False

    # --- incoming migrations (marked by the daemon at the migrate hook) ----
    def incoming_path(self, driver, domain):
        return os.path.join(self.state_dir, "incoming", "%s-%s" % (driver, _safe_name(domain)))

    def mark_incoming(self, driver, domain):
        path = self.incoming_path(driver, domain)
        try:
            dir_fd = safefile.open_dir(os.path.dirname(path), create=True)
            try:
                safefile.touch_at(dir_fd, os.path.basename(path))
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(path=path, reason=_why(exc)) from None

    def is_incoming(self, driver, domain):
        return os.path.exists(self.incoming_path(driver, domain))

    def clear_incoming(self, driver, domain):
        try:
            os.unlink(self.incoming_path(driver, domain))
        except OSError:
            pass

    # --- bridge records: VLAN filtering we changed, to restore later ------
    def bridge_path(self, bridge):
        return os.path.join(self.state_dir, "bridges", "%s.json" % _safe_name(bridge))

    def load_bridge(self, bridge):
        try:
            with open(self.bridge_path(bridge), encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(path=self.bridge_path(bridge), reason="unreadable record: %s" % exc) from None

    def save_bridge(self, bridge, data):
        path = self.bridge_path(bridge)
        _atomic_write(path, json.dumps(data, indent=1, sort_keys=True).encode())

    def remove_bridge(self, bridge):
        try:
            os.unlink(self.bridge_path(bridge))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(path=self.bridge_path(bridge), reason=exc.strerror) from None

    def has_pending_bridges(self):
        """Is a bridge's vlan_filtering switch left pending (its writer died before settling it)? Cheap."""
        for name in self.bridge_names():
            try:
                rec = self.load_bridge(name)
            except StateError:
                continue
            if isinstance(rec, dict) and rec.get("pending"):
                return True
        return False

    def bridge_names(self):
        """Names of the bridges with a record (file names decoded as written)."""
        directory = os.path.dirname(self.bridge_path("x"))
        try:
            return sorted(n[:-5] for n in os.listdir(directory) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return []

    def all(self):
        """Every record, sorted by file name. Broken files are skipped."""
        try:
            names = sorted(os.listdir(self.domain_dir))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                out.append(_parsed(os.path.join(self.domain_dir, name)))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out


# Parsed records by path: a record is written whole under a new inode
# (_atomic_write renames), so an unchanged (inode, mtime, size) is an unchanged
# record. fdbhookd reads every record at each start (MAC claims) and resync:
# a stat per file instead of a parse.
_PARSED = {}


def _parsed(path):
    st = os.stat(path)
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _PARSED.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    with open(path, encoding="utf-8") as handle:
        record = record_from_json(json.load(handle))
    if len(_PARSED) > 100000:
        _PARSED.clear()
    _PARSED[path] = (key, record)
    return record
