"""One domain operation = one transaction: intent first, then the kernel, then the record.

Every path that changes a port (apply, teardown, drift repair, pause and
resume, hotplug, a guest MAC change) plans all of its ports without writing,
then writes an *intent* durably (``STATE/intents/DRIVER-NAME.json``): the old
record, the new record, and per port the state wanted and the state read just
before (learning, flood, lock, VLANs, the entries it replaces or removes).
Then the kernel writes, then the record, then the intent goes.

A run killed anywhere in between leaves the intent behind. ``recover`` (the
first thing of every operation under the store's lock, of fdbhookd's start-up
and every resync, and of ``fdbhook status``) finishes it when the kernel
already matches every wanted port (the record is saved), else rolls every
port back to its state-before and puts the old record back. So a port is
always either managed as its record says, or as it was; and the state-before
of a new record is never a half-changed port.

The JSON round trip of the port states is pure (tests/unit/test_txn.py).
"""

import logging

from fdbhook import lockdown
from fdbhook import plan as planner
from fdbhook.current import read_port
from fdbhook.errors import KernelError, StateError
from fdbhook.model import CurrentPort, DesiredPort, FdbEntry, Op
from fdbhook.state import record_from_json, record_to_json

LOG = logging.getLogger(__name__)

FORMAT = 1


# --- pure: port states <-> JSON ---------------------------------------------------------

def _keys(keys):
    return sorted([mac, vid] for mac, vid in keys)


def _membership(value):
    return None if value is None else [list(m) for m in value]


def _membership_back(value):
    return None if value is None else tuple((int(v), bool(p), bool(u)) for v, p, u in value)


def desired_to_json(want):
    return {"port": want.port, "ifindex": want.ifindex, "bridge": want.bridge, "bridge_ifindex": want.bridge_ifindex,
            "entries": _keys(want.entries), "watch": _keys(want.watch), "sticky": want.sticky,
            "learning": want.learning, "flood": want.flood, "membership": _membership(want.membership),
            "locked": want.locked, "mab": want.mab}


def desired_from_json(data):
    return DesiredPort(port=str(data["port"]), ifindex=int(data["ifindex"]), bridge=str(data["bridge"]),
                       bridge_ifindex=int(data["bridge_ifindex"]),
                       entries=frozenset((str(m), int(v)) for m, v in data["entries"]),
                       watch=frozenset((str(m), int(v)) for m, v in data["watch"]),
                       sticky=bool(data["sticky"]), learning=bool(data["learning"]), flood=bool(data["flood"]),
                       membership=_membership_back(data["membership"]),
                       locked=_opt_bool(data["locked"]), mab=_opt_bool(data["mab"]))


def _opt_bool(value):
    return None if value is None else bool(value)


_ENTRY_FIELDS = ("mac", "ifindex", "static", "local", "sticky", "vlan", "locked", "extern_learn", "on_vxlan")


def current_to_json(have):
    return {"port": have.port, "ifindex": have.ifindex, "exists": have.exists, "learning": have.learning,
            "flood": have.flood, "locked": have.locked, "mab": have.mab,
            "entries": [[[mac, vid], None if e is None else {f: getattr(e, f) for f in _ENTRY_FIELDS}]
                        for (mac, vid), e in have.entries],
            "membership": _membership(have.membership)}


def current_from_json(data):
    entries = tuple(((str(k[0]), int(k[1])), None if e is None else FdbEntry(**{f: e[f] for f in _ENTRY_FIELDS}))
                    for k, e in data["entries"])
    return CurrentPort(port=str(data["port"]), ifindex=int(data["ifindex"]), exists=bool(data["exists"]),
                       learning=bool(data["learning"]), flood=bool(data["flood"]),
                       locked=_opt_bool(data["locked"]), mab=_opt_bool(data["mab"]), entries=entries,
                       membership=_membership_back(data["membership"]))


def intent_to_json(driver, domain, old, new, ports):
    """The intent of one operation: ``ports`` [(DesiredPort, CurrentPort before)]."""
    return {"format": FORMAT, "driver": driver, "domain": domain,
            "old": record_to_json(old) if old is not None and old.nics else None,
            "new": record_to_json(new) if new is not None and new.nics else None,
            "ports": [{"want": desired_to_json(w), "before": current_to_json(b)} for w, b in ports]}


def intent_from_json(data):
    """(driver, domain, old record or None, new record or None, [(want, before)]); ValueError if malformed."""
    try:
        if data.get("format") != FORMAT:
            raise ValueError("unknown intent format %r" % data.get("format"))
        old = record_from_json(data["old"]) if data.get("old") else None
        new = record_from_json(data["new"]) if data.get("new") else None
        ports = [(desired_from_json(p["want"]), current_from_json(p["before"])) for p in data["ports"]]
        return str(data["driver"]), str(data["domain"]), old, new, ports
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        raise ValueError("malformed intent: %s" % (exc,)) from None


# --- the kernel side ----------------------------------------------------------------------

def restore_port(kernel, want, before):
    """Put one port back exactly as ``before``, through the one write path; verified. KernelError if not."""
    target = planner.restore_state(want, before)
    have = read_port(kernel, target)
    ops = planner.plan_port(target, have)
    if not ops:
        return
    kernel.execute_many(ops)
    left = planner.drift(target, read_port(kernel, target))
    if left:
        raise KernelError(what="restoring %s" % want.port, reason="still " + ", ".join(left))


def _matches(kernel, want):
    """Is this port as wanted (or gone: nothing of ours left on it)?"""
    have = read_port(kernel, want)
    return not have.exists or not planner.plan_port(want, have)


def _save(store, record, driver, domain):
    if record is None:
        store.remove(driver, domain)
    else:
        store.save(record)


# --- armed intents: written ahead of the kernel writes they cover (engine.arm_record) -------------------
#
# An armed intent is complete (old record, new record, every port's state
# before): it only waits for its trigger, an incoming guest's first frame.
# It carries the token of the process that armed it; recovery leaves it to
# that process while it lives, and treats it like any other intent once it
# is gone (finished when the ports match, else the ports are put back; the
# record is left as it is, an armed operation writes it only after the kernel).

_ARMED = set()  # nonces of this process's armed intents not yet fired or disarmed


def process_start(pid):
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22), or None if it is gone: with
    the pid, it names one process (a pid alone may be reused)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            data = handle.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def arm_token():
    """A new token of this process for an armed intent (registered as live until ``disarmed``)."""
    import os

    token = {"pid": os.getpid(), "start": process_start(os.getpid()), "nonce": os.urandom(8).hex()}
    _ARMED.add(token["nonce"])
    return token


def disarmed(token):
    _ARMED.discard(token.get("nonce"))


def armed_alive(token):
    """Will the process that armed this intent still fire or disarm it? (This process: if it says so.)"""
    import os

    if not isinstance(token, dict):
        return False
    try:
        pid = int(token["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if pid == os.getpid():
        return token.get("nonce") in _ARMED
    start = process_start(pid)
    return start is not None and start == token.get("start")


def recover(kernel, store, all_pending=False):
    """Finish or roll back what killed runs left (call with the store's lock held).

    Then pending lock-downs (fdbhook.lockdown.settle): claimed ones are
    dropped, the rest past their bound (``all_pending``: all of them) are put
    back as they were.

    Returns {(driver, domain): reason} of intents that could not be recovered
    now (they stay; the next run tries again and refuses to change that
    domain meanwhile). Orphan temp files of killed writers are removed.
    """
    left = {}
    intents = store.intents()
    kernel.forget()
    for path, data in intents:
        try:
            if not isinstance(data, dict):
                raise ValueError("unreadable intent")
            driver, domain, old, new, ports = intent_from_json(data)
        except ValueError as exc:
            LOG.error("intent %s: %s; moved aside to %s.bad, nothing recovered", path, exc, path)
            _set_aside(path)
            continue
        armed = data.get("armed")
        if armed is not None and armed_alive(armed):
            continue  # planned ahead and still awaited by the process that armed it
        try:
            if all(_matches(kernel, want) for want, _ in ports):
                _save(store, new, driver, domain)
                what = "finished"
            else:
                for want, before in ports:
                    restore_port(kernel, want, before)
                if armed is None:
                    _save(store, old, driver, domain)
                what = "rolled back"
            store.remove_intent(driver, domain)
            LOG.warning("%s/%s: an interrupted operation was %s (%d ports)", driver, domain, what, len(ports))
        except Exception as exc:  # noqa: BLE001 - nothing read from disk may stop the run; this domain waits
            LOG.error("%s/%s: recovering an interrupted operation failed: %s", driver, domain, exc)
            left[(driver, domain)] = str(exc)
        finally:
            kernel.forget()
    settle_bridges(kernel, store)
    if store.has_pending():
        lockdown.settle(kernel, store, everything=all_pending)
    if intents:
        store.clean_temp_files()
    return left


# --- bridges: a VLAN filtering switch is a transaction of its own -------------------------
#
# The bridge record (STATE/bridges/NAME.json) is its intent: written with the
# state-before and ``pending`` before the kernel write, settled once the
# domain operation that needed it is over. A pending record that a later run
# finds (its writer died) is finished when a managed guest uses the bridge,
# else rolled back: the bridge put back as it was, the record removed.

def bridge_op(name, ifindex, vlan_filtering):
    """The plan.Op that sets a bridge's VLAN filtering (sent through Kernel.execute_many, like every write)."""
    return Op(kind="bridge_set", port=name, ifindex=ifindex, bridge=name, bridge_ifindex=ifindex,
              vlan_filtering=bool(vlan_filtering))


def switch_bridge(kernel, store, name, ifindex, current, want, restore, rec):
    """Record the bridge's state-before (pending) durably, then switch its VLAN filtering to ``want``.

    StateError: the record could not be written, nothing changed. KernelError:
    the kernel refused the one request; the pending record stays for the
    caller (or a later run) to settle.
    """
    if rec is None or "prev_vlan_filtering" not in rec:
        rec = {"bridge": name, "ifindex": ifindex, "prev_vlan_filtering": bool(current)}
    rec = dict(rec, set_vlan_filtering=bool(want), restore=restore, pending=True)
    store.save_bridge(name, rec)
    kernel.execute_many([bridge_op(name, ifindex, want)])


def restore_bridge(kernel, name, rec):
    """Put a recorded bridge's VLAN filtering back as it was (if it is still the same bridge). KernelError."""
    bridge = rec.get("bridge", name)
    link = kernel.by_index(rec.get("ifindex"))
    if link is None or link.name != bridge or link.kind != "bridge" or "prev_vlan_filtering" not in rec:
        return False
    prev = bool(rec["prev_vlan_filtering"])
    if kernel.bridge_vlan_filtering(link.ifindex) != prev:
        kernel.execute_many([bridge_op(bridge, link.ifindex, prev)])
        return True
    return False


def settle_bridges(kernel, store, names=None, keep=False):
    """Finish or roll back pending bridge switches (store lock held); ``keep``: finish them all.

    A bridge a managed guest uses (a domain record names it) keeps its
    switch; any other is put back as it was and its record goes. Errors are
    logged and leave the record pending for the next run.
    """
    pending = []
    for name in store.bridge_names() if names is None else names:
        try:
            rec = store.load_bridge(name)
        except Exception:  # noqa: BLE001 - a bad record is never fatal
            continue
        if isinstance(rec, dict) and rec.get("pending"):
            pending.append((name, rec))
    if not pending:
        return
    in_use = set() if keep else {nic.bridge for record in store.all() for nic in record.nics}
    for name, rec in pending:
        bridge = rec.get("bridge", name)
        try:
            if keep or bridge in in_use:
                store.save_bridge(name, {k: v for k, v in rec.items() if k != "pending"})
                continue
            kernel.forget()
            if restore_bridge(kernel, name, rec):
                LOG.warning("bridge %s: vlan_filtering put back to %s (no managed guest uses it)", bridge,
                            "on" if rec["prev_vlan_filtering"] else "off")
            store.remove_bridge(name)
        except Exception as exc:  # noqa: BLE001 - the next run tries again
            LOG.error("bridge %s: settling its vlan_filtering switch failed: %s", bridge, exc)


def _set_aside(path):
    import os
    try:
        os.rename(path, path + ".bad")
    except OSError:
        pass


class Transaction:
    """One domain operation's intent: ``begin`` before the first kernel write, ``commit`` with the record."""

    def __init__(self, store, driver, domain, old):
        self.store, self.driver, self.domain, self.old = store, driver, domain, old
        self.open = False
        self.broken = False  # a rollback failed: the intent must stay for recovery

    def begin(self, new, ports):
        """Write the intent if anything is to be written (``ports``: [(want, before)]). StateError: nothing done."""
        if ports:
            self.store.save_intent(self.driver, self.domain,
                                   intent_to_json(self.driver, self.domain, self.old, new, ports))
            self.open = True

    def commit(self, record, changed=True):
        """Save the record (unless unchanged), then drop the intent. StateError propagates (caller rolls back)."""
        if self.broken:
            LOG.error("%s/%s: a port could not be restored; left for recovery", self.driver, self.domain)
            return
        if changed:
            _save(self.store, record if record.nics else None, self.driver, self.domain)
        self.close()

    def close(self):
        if self.open:
            self.store.remove_intent(self.driver, self.domain)
            self.open = False


def needs_recovery(store):
    """Is anything left for ``recover`` (an intent, a pending bridge switch, a pending lock-down)? Cheap."""
    return store.has_intents() or store.has_pending_bridges() or store.has_pending()


def mark_bridges(store, names):
    """Before a teardown's intent: the switched bridges it may leave unused become pending (their undo).

    Settled after the commit (or by any later run): a bridge a guest still
    uses keeps its switch, any other is put back. Returns the names marked.
    """
    marked = []
    for name in sorted(set(names)):
        try:
            rec = store.load_bridge(name)
        except StateError:
            continue
        if isinstance(rec, dict) and "prev_vlan_filtering" in rec and rec.get("restore", True) \
                and not rec.get("pending"):
            store.save_bridge(name, dict(rec, pending=True))
            marked.append(name)
    return marked


def refuse_unrecovered(left, driver, domain, store):
    """StateError when ``driver/domain`` has an intent recovery could not finish."""
    if (driver, domain) in left:
        raise StateError(path=store.intent_path(driver, domain),
                         reason="domain %s: an interrupted operation could not be recovered yet (%s); "
                                "nothing changed" % (domain, left[(driver, domain)]))
