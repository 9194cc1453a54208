"""Records of what fdbhook applied, under the state directory.

stopped/release hooks get XML without port or bridge names, so teardown works
from these records. One JSON file per domain (``domains/DRIVER-NAME.json``),
written atomically (temp file, fsync, rename); one lock file serialises every
read-modify-write, so concurrent hooks for different domains on one bridge
never lose an update.

Nothing read here may kill a reader: a record that does not parse, or parses
into the wrong shape, is renamed aside into ``domains/.quarantine/`` (logged
once, with its path; ``fdbhook status`` lists it) and the second copy every
save writes first (``domains.prev/``) takes its place, so teardown still
finds the ports' original state. Only when both copies are bad is the record
lost (then the ports keep fdbhook's flags until an admin looks).
"""

import dataclasses
import errno
import fcntl
import json
import logging
import os
import stat
import time
from contextlib import contextmanager

from fdbhook import faults, safefile
from fdbhook.errors import StateError
from fdbhook.model import DomainRecord, NicRecord

LOG = logging.getLogger(__name__)

FORMAT = 1
QUARANTINE = ".quarantine"
PREV = "domains.prev"  # beside domains/, whose listing stays one file per record
PENDING_PREV = "pending.prev"
BRIDGES_PREV = "bridges.prev"
TMP_PREFIX = ".tmp-"
MAX_RECORD_BYTES = 4 * 1024 * 1024  # a record of 1,000 NICs is ~0.5 MB


class BadRecord(ValueError):
    """A record file that is not a record (any shape, any content)."""


def record_to_json(record):
    return {
        "format": FORMAT,
        "driver": record.driver,
        "domain": record.domain,
        "uuid": record.uuid,
        "paused": record.paused,
        "nics": [dataclasses.asdict(nic) for nic in record.nics],
    }


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v):
    return isinstance(v, str)


def _opt(check):
    return lambda v: v is None or check(v)


def _list_of(check):
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _is_membership(v):
    return isinstance(v, list) and all(isinstance(m, list) and len(m) == 3 and _is_int(m[0])
                                       and isinstance(m[1], bool) and isinstance(m[2], bool) for m in v)


# Every NicRecord field and what JSON must hold for it; required ones first.
_NIC_REQUIRED = {"mac": _is_str, "port": _is_str, "ifindex": _is_int, "bridge": _is_str}
_NIC_OPTIONAL = {
    "network": _opt(_is_str), "prev_learning": lambda v: isinstance(v, bool),
    "prev_flood": lambda v: isinstance(v, bool), "sticky": lambda v: isinstance(v, bool),
    "applied": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "alias": _opt(_is_str), "vids": _opt(_list_of(_is_int)), "prev_vlans": _opt(_is_membership),
    "set_vlans": _opt(_is_membership), "config_mac": _opt(_is_str), "extra_macs": _opt(_list_of(_is_str)),
    "locked": lambda v: isinstance(v, bool), "prev_locked": lambda v: isinstance(v, bool),
    "mab": lambda v: isinstance(v, bool), "floating_macs": _opt(_list_of(_is_str)),
}


def _nic_from_json(nic, i):
    if not isinstance(nic, dict):
        raise BadRecord("nics[%d] is %s, not an object" % (i, type(nic).__name__))
    for key, check in _NIC_REQUIRED.items():
        if key not in nic or not check(nic[key]):
            raise BadRecord("nics[%d].%s missing or of the wrong type" % (i, key))
    for key, check in _NIC_OPTIONAL.items():
        if key in nic and not check(nic[key]):
            raise BadRecord("nics[%d].%s of the wrong type" % (i, key))
    fields = {f.name for f in dataclasses.fields(NicRecord)}
    values = {k: v for k, v in nic.items() if k in fields}
    # JSON has no tuples; the records compare equal only with them.
    values["vids"] = tuple(values.get("vids") or ())
    for key in ("prev_vlans", "set_vlans"):
        if values.get(key) is not None:
            values[key] = tuple(tuple(m) for m in values[key])
    return NicRecord(**values)


def record_from_json(data):
    """A DomainRecord from parsed JSON; BadRecord (a ValueError) for anything else."""
    if not isinstance(data, dict):
        raise BadRecord("a record is an object, not %s" % type(data).__name__)
    for key in ("driver", "domain"):
        if not isinstance(data.get(key), str):
            raise BadRecord("%s missing or not a string" % key)
    nics = data.get("nics", [])
    if not isinstance(nics, list):
        raise BadRecord("nics is not a list")
    if not _opt(_is_str)(data.get("uuid")) or not isinstance(data.get("paused", False), bool):
        raise BadRecord("uuid or paused of the wrong type")
    return DomainRecord(driver=data["driver"], domain=data["domain"], uuid=data.get("uuid"),
                        nics=tuple(_nic_from_json(nic, i) for i, nic in enumerate(nics)),
                        paused=data.get("paused", False))


def parse_record(raw):
    """Bytes of a record file -> DomainRecord; BadRecord for anything else (never another exception)."""
    if len(raw) > MAX_RECORD_BYTES:
        raise BadRecord("larger than %d bytes" % MAX_RECORD_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRecord("not JSON: %s" % str(exc).splitlines()[0][:120]) from None
    except RecursionError:
        raise BadRecord("JSON nested too deeply") from None
    try:
        return record_from_json(data)
    except BadRecord:
        raise
    except (RecursionError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise BadRecord("%s: %s" % (exc.__class__.__name__, exc)) from None


def read_record(path):
    """The record in ``path``, None if there is none; BadRecord if it is not a record."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise BadRecord("a directory") from None
    return parse_record(raw)


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


def _atomic_write(path, data, durable=True):
    """Write ``data`` to ``path`` so readers see the old or the new file, never half; durable on return.

    The one write path of the state directory, through fdbhook.safefile: the
    directory verified (root's, no symlink on the way), an O_EXCL temp file
    with a random name, fsync, rename, fsync of the directory. fdbhook.faults
    counts here. ``durable=False`` skips both fsyncs (a kill loses nothing
    either way; a power loss may keep the old file).
    """
    try:
        safefile.write_file(path, data, mode=0o600, dir_mode=0o700, fsync=durable)
    except OSError as exc:
        raise StateError(path=path, reason=_why(exc)) from None
    if faults.armed():
        faults.file_done()


def _json_object(path, check=None):
    """A small record file's JSON object; BadRecord if it is not one (``check`` raising ValueError too)."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_RECORD_BYTES + 1)
    try:
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError("over %d bytes" % MAX_RECORD_BYTES)
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if check is not None:
            check(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRecord(str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None
    return data


def _bound(check, ifindex):
    """``check(ifindex, data)`` as a check of ``data`` alone (None for None)."""
    return None if check is None else (lambda data: check(ifindex, data))


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
    """Remove ``.tmp-*`` files a killed writer left behind (call with the store's lock held).

    A writer that takes no lock (the salvage of a bad record in ``_load_path``,
    a lock-down's pending record) may be writing one right now: the files of
    a process still alive, this one included, are left alone.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if name.startswith(TMP_PREFIX) and not _writer_alive(name):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except OSError:
                pass
    return removed


def _writer_alive(name):
    """Is the process named in a ``.tmp-<pid>-<hex>`` file still there? (An older name: no.)"""
    pid, sep, _ = name[len(TMP_PREFIX):].partition("-")
    if not sep or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: somebody's process by that number is alive
        return True
    return True


def _create_if_absent(path, data):
    """Like _atomic_write, but never replaces a file that is there (then False): temp file, link."""
    tmp = safefile.tmp_name()
    try:
        dir_fd = safefile.open_dir(os.path.dirname(path))
    except OSError as exc:
        raise StateError(path=path, reason=_why(exc)) from None
    try:
        fd = safefile.open_at(dir_fd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, os.path.basename(path), src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        os.fsync(dir_fd)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise StateError(path=path, reason=_why(exc)) from None
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        os.close(dir_fd)


class Store:
    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.domain_dir = os.path.join(state_dir, "domains")
        self.quarantine_dir = os.path.join(self.domain_dir, QUARANTINE)
        self.prev_dir = os.path.join(state_dir, PREV)

    def _ensure(self):
        _ensure_dir(self.domain_dir)

    def lock_file(self):
        """An fd of the store's lock file (its directory walked and checked), for ``lock(fd)``; the caller
        closes it. StateError if it cannot be opened."""
        self._ensure()
        path = os.path.join(self.state_dir, "lock")
        try:
            dir_fd = safefile.open_dir(self.state_dir)
            try:
                return safefile.open_at(dir_fd, "lock", os.O_RDWR | os.O_CREAT, 0o600)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise StateError(path=path, reason=_why(exc)) from None

    @contextmanager
    def lock(self, fd=None):
        """Hold the store's exclusive lock (blocks until it is free).

        ``fd``: the lock file opened ahead (``lock_file``), which stays open:
        one flock, not the ~25 syscalls of walking and checking the path
        (fdbhookd's first-frame path, where each hands the GIL over).
        """
        own = fd is None
        fd = self.lock_file() if own else fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            if own:
                os.close(fd)  # closing releases the lock
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def clean_temp_files(self):
        """Remove the temp files of writes a kill interrupted. Call with the lock held."""
        removed = sum(clean_temp_files(d) for d in (self.state_dir, self.domain_dir, self.prev_dir,
                                                     self.intent_dir(), os.path.join(self.state_dir, "bridges"),
                                                     self.pending_dir(),
                                                     os.path.join(self.state_dir, PENDING_PREV),
                                                     os.path.join(self.state_dir, BRIDGES_PREV)))
        if removed:
            LOG.info("state: removed %d temp file(s) of interrupted writes", removed)
        return removed

    def path(self, driver, domain):
        return os.path.join(self.domain_dir, "%s-%s.json" % (driver, _safe_name(domain)))

    def prev_path(self, path):
        return os.path.join(self.prev_dir, os.path.basename(path))

    def has_record(self, driver, domain):
        """Is there a record file, or its second copy alone (``_orphaned_copy``)? Cheap: one or two stats."""
        path = self.path(driver, domain)
        return os.path.exists(path) or os.path.exists(self.prev_path(path))

    def load(self, driver, domain):
        """The domain's record or None. Never raises for a bad file: see ``_load_path``."""
        return self._load_path(self.path(driver, domain))

    def _load_path(self, path, again=True):
        """A record file that is not a record is quarantined; its second copy (if good) takes its place.

        Only an I/O error other than "no such file" raises (StateError). Safe
        without the store lock: a file replaced meanwhile is read again, not
        quarantined, and the salvaged copy goes back only where no file is
        (a writer's newer record always wins).
        """
        try:
            st = os.stat(path)
            return _parsed(path, st)
        except FileNotFoundError:
            return self._orphaned_copy(path)
        except BadRecord as exc:
            reason = str(exc)
        except OSError as exc:
            raise StateError(path=path, reason="unreadable record: %s" % (exc.strerror or exc)) from None
        try:
            replaced = os.stat(path).st_ino != st.st_ino
        except OSError:
            replaced = True
        if replaced and again:
            return self._load_path(path, again=False)
        self.quarantine(path, reason)
        return self._from_second_copy(path)

    def _orphaned_copy(self, path):
        """No record file, yet its second copy is there: the record was quarantined and could not be put back
        (a full disk), or its file was deleted. The copy is used and put back, unless an operation on that
        domain is under way (its intent is there: a save writes the copy before the file, and recovery
        settles it)."""
        if not os.path.exists(self.prev_path(path)):  # the usual case: no record at all, one stat
            return None
        if os.path.exists(os.path.join(self.intent_dir(), os.path.basename(path))):
            return None
        LOG.warning("state %s: missing, its second copy is there", path)
        return self._from_second_copy(path)

    def _from_second_copy(self, path):
        """The record's second copy (quarantined if bad), put back where no record file is; None if none."""
        prev = self.prev_path(path)
        try:
            record = read_record(prev)
        except BadRecord as exc:
            self.quarantine(prev, "second copy: %s" % exc)
            record = None
        except OSError:
            record = None
        if record is None:
            LOG.error("state %s: no good second copy: the record is lost (ports it named keep fdbhook's flags)",
                      path)
            return None
        try:
            if _create_if_absent(path, _encode(record)):
                LOG.warning("state %s: restored from its second copy %s", path, prev)
        except StateError as exc:  # still usable from the copy this time
            LOG.error("%s (the second copy %s is used)", exc, prev)
        return record

    # --- records kept in two copies (domains, pending ports, bridges) ----
    def _save_pair(self, path, prev, raw):
        """Write ``raw`` to ``path`` after its second copy ``prev`` (not synced: it is for a file damaged
        later, not for a crash). A failed write of the record leaves no copy of it (removing works on a full
        disk); a kill between the two leaves a copy the next save of that file overwrites first."""
        _ensure_dir(os.path.dirname(prev))
        _atomic_write(prev, raw, durable=False)
        try:
            _atomic_write(path, raw)
        except StateError:
            try:
                os.unlink(prev)
            except OSError:
                pass
            raise

    def _remove_pair(self, path, prev):
        """Remove the copy first (a kill between the two leaves the record whole, never a lone copy)."""
        _unlink(prev)
        _unlink(path)

    def _load_pair(self, path, prev, check, prefix, unknown, again=True):
        """The JSON object in ``path``; FileNotFoundError if there is none.

        ``check(data)`` raises ValueError for an object that is not such a
        record. A file that does not parse or fails it is linked aside into
        the quarantine and its second copy renamed into its place (the path
        is never missing meanwhile); None (both quarantined, ``unknown``
        logged) when the copy is bad too. Never raises otherwise.
        """
        st = None
        try:
            st = os.stat(path)
            return _json_object(path, check)
        except BadRecord as exc:
            reason = str(exc)
        except FileNotFoundError:
            raise
        except OSError as exc:
            reason = exc.strerror or str(exc)
        try:
            replaced = st is None or os.stat(path).st_ino != st.st_ino
        except FileNotFoundError:
            raise
        except OSError:
            replaced = True
        if replaced and again:  # a writer replaced it since it was read: read the new one
            return self._load_pair(path, prev, check, prefix, unknown, again=False)
        try:
            data = _json_object(prev, check)
        except (OSError, BadRecord) as exc:
            self.quarantine(path, reason, prefix=prefix)
            if isinstance(exc, BadRecord):
                self.quarantine(prev, "second copy: %s" % exc, prefix=prefix)
            LOG.error("state %s: no good second copy (%s): %s", path,
                      exc.strerror if isinstance(exc, OSError) else exc, unknown)
            return None
        keep = st is None or not stat.S_ISDIR(st.st_mode)  # a directory cannot be linked aside: moved
        if self.quarantine(path, reason, keep=keep, prefix=prefix) is not None:
            try:
                os.rename(prev, path)
                LOG.warning("state %s: restored from its second copy %s", path, prev)
            except OSError as exc:  # still usable from the copy this time
                LOG.error("state %s: cannot put its second copy back: %s (the copy is used)", path,
                          exc.strerror or exc)
        return data

    def quarantine(self, path, reason, keep=False, prefix=""):
        """Rename a bad file aside (logged once: it is gone from where it was read). ``keep``: link it aside
        instead, for a caller that replaces it in one rename (a path that must never be missing)."""
        target = os.path.join(self.quarantine_dir, "%s%s.%s" % (prefix, os.path.basename(path),
                                                               time.strftime("%Y%m%dT%H%M%S")))
        try:
            safefile.ensure_dir(self.quarantine_dir, 0o700)
            n = 0
            while os.path.exists(target + ("" if not n else ".%d" % n)):
                n += 1
            target += "" if not n else ".%d" % n
            (os.link if keep else os.rename)(path, target)
        except OSError as exc:
            LOG.error("state %s: bad record (%s); cannot quarantine it: %s", path, reason, exc.strerror or exc)
            return None
        _PARSED.pop(path, None)
        LOG.error("state %s: bad record (%s): moved to %s", path, reason, target)
        return target

    def quarantined(self):
        """Paths of the files in quarantine (``fdbhook status`` lists them)."""
        try:
            return sorted(os.path.join(self.quarantine_dir, n) for n in os.listdir(self.quarantine_dir))
        except OSError:
            return []

    def save(self, record):
        """Write (or, with no NICs left, remove) a domain's record atomically.

        The second copy goes first: at every instant at least one of the two
        files holds the last committed record or the new one, whole. Only the
        record itself is synced (the second copy is for a record damaged
        later, not for a crash: the record is whole on disk before its
        rename), which keeps a start at four fsyncs instead of six.
        """
        path = self.path(record.driver, record.domain)
        if not record.nics:
            self.remove(record.driver, record.domain)
            return
        self._ensure()
        # The caller rolls the kernel back to the old record if this fails: no second copy of the new one outlives it.
        self._save_pair(path, self.prev_path(path), _encode(record))

    def is_saved(self, record):
        """Do the record and its second copy both hold exactly ``record``? (Then saving it again writes nothing new.)"""
        data = _encode(record)
        path = self.path(record.driver, record.domain)
        for victim in (path, self.prev_path(path)):
            try:
                with open(victim, "rb") as handle:
                    if handle.read(len(data) + 1) != data:
                        return False
            except OSError:
                return False
        return True

    def remove(self, driver, domain):
        path = self.path(driver, domain)
        for victim in (self.prev_path(path), path):
            _unlink(victim)

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

    def stamp(self, driver, domain):
        """Which intent and record files of a domain are there now ((inode, mtime, size) or None each): every
        write replaces a file, so any write since changes it."""
        out = []
        for path in (self.intent_path(driver, domain), self.path(driver, domain)):
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
                continue
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

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
        return _has_json(self.intent_dir())

    # --- pending ports: guest ports locked down at the join, their NIC not known yet (fdbhook.lockdown) ----
    def pending_dir(self):
        return os.path.join(self.state_dir, "pending")

    def pending_path(self, ifindex):
        return os.path.join(self.pending_dir(), "%d.json" % int(ifindex))

    def has_pending_port(self, ifindex):
        return os.path.exists(self.pending_path(ifindex))

    def pending_prev_path(self, ifindex):
        return os.path.join(self.state_dir, PENDING_PREV, "%d.json" % int(ifindex))

    def save_pending(self, ifindex, data):
        """Write a pending record after its second copy (``_save_pair``)."""
        _ensure_dir(self.pending_dir())
        self._save_pair(self.pending_path(ifindex), self.pending_prev_path(ifindex),
                        json.dumps(data, sort_keys=True).encode())

    def remove_pending(self, ifindex):
        self._remove_pair(self.pending_path(ifindex), self.pending_prev_path(ifindex))

    def pending(self, check=None):
        """[(ifindex, JSON object or None)] of every pending port, by ifindex. Never raises.

        ``check(ifindex, data)`` raises ValueError for data that is not a
        pending record (fdbhook.lockdown.parse_pending). A file that does not
        parse or fails it is quarantined and its second copy takes its place
        in one rename (the record's path is never missing meanwhile); None
        only when both are bad (the port's state before is then unknown).
        """
        try:
            names = os.listdir(self.pending_dir())
        except OSError:
            return []
        out = []
        for name in sorted(names):
            stem = name[:-5]
            if not name.endswith(".json") or not stem.isdigit():
                continue
            try:
                out.append((int(stem), self._load_pair(self.pending_path(int(stem)),
                                                       self.pending_prev_path(int(stem)),
                                                       _bound(check, int(stem)), "pending-",
                                                       "the port's state before its lock-down is unknown; "
                                                       "the port is left as it is")))
            except FileNotFoundError:  # removed since the listing: settled meanwhile
                continue
        return out

    def has_pending(self):
        return _has_json(self.pending_dir())

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

    def bridge_prev_path(self, bridge):
        return os.path.join(self.state_dir, BRIDGES_PREV, os.path.basename(self.bridge_path(bridge)))

    def load_bridge(self, bridge):
        """The bridge's record (a dict) or None. A bad file is quarantined and its second copy used
        (``_load_pair``); None if that is bad too. Never raises."""
        try:
            return self._load_pair(self.bridge_path(bridge), self.bridge_prev_path(bridge), None, "bridge-",
                                   "the bridge's vlan_filtering from before fdbhook is unknown; it is left as "
                                   "it is")
        except FileNotFoundError:
            return None

    def save_bridge(self, bridge, data):
        _ensure_dir(os.path.dirname(self.bridge_path(bridge)))
        self._save_pair(self.bridge_path(bridge), self.bridge_prev_path(bridge),
                        json.dumps(data, indent=1, sort_keys=True).encode())

    def remove_bridge(self, bridge):
        self._remove_pair(self.bridge_path(bridge), self.bridge_prev_path(bridge))

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
        """Every record, sorted by file name. Bad files are quarantined (their second copy used); never raises."""
        try:
            names = set(os.listdir(self.domain_dir))
        except OSError:
            return []
        try:  # a record only its second copy holds (see _orphaned_copy)
            names.update(n for n in os.listdir(self.prev_dir) if n.endswith(".json") and not n.startswith("."))
        except OSError:
            pass
        out = []
        for name in sorted(names):
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                record = self._load_path(os.path.join(self.domain_dir, name))
            except StateError as exc:
                LOG.error("%s", exc)
                continue
            if record is not None:
                out.append(record)
        return out


def _has_json(directory):
    """Is there a ``*.json`` file in ``directory``? False when it cannot be listed (cheap: status, start-up)."""
    try:
        return any(n.endswith(".json") for n in os.listdir(directory))
    except OSError:
        return False


def _encode(record):
    return json.dumps(record_to_json(record), indent=1, sort_keys=True).encode()


# Parsed records by path: a record is written whole under a new inode
# (_atomic_write renames), so an unchanged (inode, mtime, size) is an unchanged
# record. fdbhookd reads every record at each start (MAC claims) and resync:
# a stat per file instead of a parse.
_PARSED = {}


def _parsed(path, st=None):
    """The record in ``path`` (cached); FileNotFoundError, BadRecord or another OSError."""
    st = os.stat(path) if st is None else st
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _PARSED.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    record = read_record(path)
    if record is None:
        raise FileNotFoundError(errno.ENOENT, "gone", path)
    if len(_PARSED) > 100000:
        _PARSED.clear()
    _PARSED[path] = (key, record)
    return record
