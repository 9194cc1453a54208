"""Desired vs current -> ordered kernel operations. Pure functions only.

Order matters for a guest that is already passing traffic:
  apply:    static entry first (the guest's frames now have a fixed path),
            learning off, flush what the port learned, unicast flood off last;
  teardown: flood back on first, then drop the entry, then learning back on.
At no point is the guest's MAC neither in the FDB nor flooded to its port.
"""

from fdbhook.model import Op


def entry_conflict(port, ifindex, mac, entry, owned):
    """Why we must not take over ``entry`` for ``mac``, or None if we may.

    A learned (dynamic) entry on another port is the kernel's guess and may be
    replaced; a static or local entry elsewhere belongs to someone else.
    """
    if entry is None or entry.ifindex == ifindex or entry.dynamic or owned:
        return None
    kind = "local" if entry.local else "static"
    return "MAC %s already has a %s FDB entry on another port (ifindex %d), not ours; refusing to move it to %s" % (
        mac, kind, entry.ifindex, port)


def plan_apply(decision, current, entry, sticky, first_time):
    """Ops that bring a managed port to: static entry, no learning, no flood."""
    port, idx = decision.port, decision.ifindex
    common = dict(port=port, ifindex=idx, bridge=decision.bridge, bridge_ifindex=decision.bridge_ifindex)
    ops = []
    mac = decision.nic.mac
    if entry is None or entry.ifindex != idx or not entry.static or entry.sticky != sticky:
        ops.append(Op(kind="fdb_replace", mac=mac, sticky=sticky, **common))
    if current.learning:
        ops.append(Op(kind="set_flags", learning=False, **common))
    if current.learning or first_time:
        # Whatever the port learned (peers' MACs, a forged source) goes now.
        ops.append(Op(kind="flush", **common))
    if current.flood:
        ops.append(Op(kind="set_flags", flood=False, **common))
    return tuple(ops)


def plan_teardown(record, link, bridge_link, entry):
    """Ops that undo ``record`` on a port that still exists and is still ours.

    A port that is gone, renamed, re-created (new ifindex) or moved to another
    bridge is not touched: its entries went with it, and it may now be
    somebody else's.
    """
    if link is None or link.ifindex != record.ifindex or link.name != record.port:
        return ()
    if bridge_link is None or bridge_link.name != record.bridge or link.master != bridge_link.ifindex:
        return ()
    common = dict(port=record.port, ifindex=record.ifindex, bridge=record.bridge,
                  bridge_ifindex=bridge_link.ifindex)
    ops = []
    if record.prev_flood and not link.flood:
        ops.append(Op(kind="set_flags", flood=True, **common))
    if entry is not None and entry.ifindex == record.ifindex and entry.static:
        ops.append(Op(kind="fdb_del", mac=record.mac, **common))
    if record.prev_learning and not link.learning:
        ops.append(Op(kind="set_flags", learning=True, **common))
    return tuple(ops)


def plan_restore(decision, before, before_entry, now_entry):
    """Ops that put a port back exactly as ``before`` after a failed apply."""
    port, idx = decision.port, decision.ifindex
    common = dict(port=port, ifindex=idx, bridge=decision.bridge, bridge_ifindex=decision.bridge_ifindex)
    mac = decision.nic.mac
    ops = [Op(kind="set_flags", learning=before.learning, flood=before.flood, **common)]
    if before_entry is not None and before_entry.ifindex == idx and before_entry.static:
        ops.append(Op(kind="fdb_replace", mac=mac, sticky=before_entry.sticky, **common))
    elif now_entry is not None and now_entry.ifindex == idx:
        # A learned entry elsewhere cannot be re-created; learning finds it again.
        ops.append(Op(kind="fdb_del", mac=mac, **common))
    return tuple(ops)


def _onoff(value):
    return "on" if value else "off"


def render(op):
    """The iproute2 command equivalent to ``op`` (for --dry-run and logs)."""
    if op.kind == "fdb_replace":
        return "bridge fdb replace %s dev %s master static%s" % (op.mac, op.port, " sticky" if op.sticky else "")
    if op.kind == "fdb_del":
        return "bridge fdb del %s dev %s master" % (op.mac, op.port)
    if op.kind == "flush":
        return "ip link set dev %s type bridge_slave fdb_flush" % op.port
    if op.kind == "set_flags":
        parts = []
        if op.learning is not None:
            parts.append("learning %s" % _onoff(op.learning))
        if op.flood is not None:
            parts.append("flood %s" % _onoff(op.flood))
        return "bridge link set dev %s %s" % (op.port, " ".join(parts))
    raise ValueError("unknown op kind %r" % op.kind)


def describe(ops):
    """Short human summary for the one-line log, e.g. 'learning off, flood off'."""
    words = []
    for op in ops:
        if op.kind == "fdb_replace":
            words.append("fdb static%s added" % (" sticky" if op.sticky else ""))
        elif op.kind == "fdb_del":
            words.append("fdb entry removed")
        elif op.kind == "flush":
            words.append("learned entries flushed")
        else:
            if op.learning is not None:
                words.append("learning %s" % _onoff(op.learning))
            if op.flood is not None:
                words.append("flood %s" % _onoff(op.flood))
    return ", ".join(words) or "already in place"
