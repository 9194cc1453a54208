"""Desired vs current -> ordered kernel operations. Pure functions only.

Order matters for a guest that is already passing traffic:
  apply:    VLAN membership first (an entry on a VLAN the port lacks is
            refused), static entries, then learning and unicast flood off
            in one request (the MAC is in the FDB by then, so nothing the
            guest should get depends on flooding), then flush what the port
            learned (after learning is off, or it would learn again);
  teardown: flood back on first, then drop the entries, then the previous
            VLAN membership, then learning back on.
At no point is the guest's MAC neither in the FDB nor flooded to its port.

VLANs: ``vids`` lists the VLANs an entry is wanted on; ``(None,)`` means
VID 0, the only choice on a bridge without VLAN filtering. On a filtering
bridge one entry per VLAN the port carries, never VID 0 plus every VLAN.
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
    where = " on VLAN %d" % entry.vlan if entry.vlan else ""
    return "MAC %s already has a %s FDB entry%s on another port (ifindex %d), not ours; refusing to move it to %s" % (
        mac, kind, where, entry.ifindex, port)


def desired_membership(vlan, trunk):
    """((vid, pvid, untagged), ...) for an access VLAN and tagged trunk VLANs."""
    want = {vid: (False, False) for vid in trunk}
    if vlan:
        want[vlan] = (True, True)
    return tuple((vid,) + want[vid] for vid in sorted(want))


def entry_vids(filtering, membership):
    """The VLANs a port's static entry must exist on."""
    if not filtering:
        return (None,)
    return tuple(vid for vid, _, _ in membership) or (None,)


def _common(port, ifindex, bridge, bridge_ifindex):
    return dict(port=port, ifindex=ifindex, bridge=bridge, bridge_ifindex=bridge_ifindex)


def plan_membership(common, want, have):
    """Ops that turn membership ``have`` into exactly ``want``."""
    ops = []
    have_map = {vid: (pvid, untagged) for vid, pvid, untagged in have}
    for vid, pvid, untagged in want:
        if have_map.get(vid) != (pvid, untagged):
            ops.append(Op(kind="vlan_add", vlan=vid, pvid=pvid, untagged=untagged, **common))
    wanted = {vid for vid, _, _ in want}
    for vid, _, _ in have:
        if vid not in wanted:
            ops.append(Op(kind="vlan_del", vlan=vid, **common))
    return ops


def plan_apply(decision, current, entries, sticky, first_time, membership=None, have_membership=(),
               want_entries=True):
    """Ops that bring a managed port to: static entries, no learning, no flood.

    ``entries`` maps each wanted VID (None = VID 0) to the bridge's current
    entry for the MAC there. ``membership``, when not None, is the VLAN
    membership the port must end up with (``have_membership`` is its current).
    """
    common = _common(decision.port, decision.ifindex, decision.bridge, decision.bridge_ifindex)
    ops = []
    if membership is not None:
        ops.extend(plan_membership(common, membership, have_membership))
    mac = decision.nic.mac
    for vid, entry in entries.items():
        ours = entry is not None and entry.ifindex == decision.ifindex
        if not want_entries:
            if ours and entry.static:
                ops.append(Op(kind="fdb_del", mac=mac, vlan=vid, **common))
        elif not ours or not entry.static or entry.sticky != sticky:
            ops.append(Op(kind="fdb_replace", mac=mac, sticky=sticky, vlan=vid, **common))
    if current.learning or current.flood:
        ops.append(Op(kind="set_flags", learning=False if current.learning else None,
                      flood=False if current.flood else None, **common))
    if current.learning or first_time:
        # Whatever the port learned (peers' MACs, a forged source) goes now.
        ops.append(Op(kind="flush", **common))
    return tuple(ops)


def plan_teardown(record, link, bridge_link, entries):
    """Ops that undo ``record`` on a port that still exists and is still ours.

    ``entries`` maps each recorded VID (None = VID 0) to the current entry. A
    port that is gone, renamed, re-created (new ifindex) or moved to another
    bridge is not touched: its entries went with it, and it may now be
    somebody else's.
    """
    if link is None or link.ifindex != record.ifindex or link.name != record.port:
        return ()
    if bridge_link is None or bridge_link.name != record.bridge or link.master != bridge_link.ifindex:
        return ()
    common = _common(record.port, record.ifindex, record.bridge, bridge_link.ifindex)
    ops = []
    if record.prev_flood and not link.flood:
        ops.append(Op(kind="set_flags", flood=True, **common))
    for vid, entry in entries.items():
        if entry is not None and entry.ifindex == record.ifindex and entry.static:
            ops.append(Op(kind="fdb_del", mac=record.mac, vlan=vid, **common))
    if record.prev_vlans is not None:
        ops.extend(plan_membership(common, record.prev_vlans, record.set_vlans or ()))
    if record.prev_learning and not link.learning:
        ops.append(Op(kind="set_flags", learning=True, **common))
    return tuple(ops)


def plan_restore(decision, before, before_entries, now_entries, before_membership=None, now_membership=()):
    """Ops that put a port back exactly as ``before`` after a failed apply."""
    common = _common(decision.port, decision.ifindex, decision.bridge, decision.bridge_ifindex)
    mac = decision.nic.mac
    ops = [Op(kind="set_flags", learning=before.learning, flood=before.flood, **common)]
    for vid, now in now_entries.items():
        prior = before_entries.get(vid)
        if prior is not None and prior.ifindex == decision.ifindex and prior.static:
            ops.append(Op(kind="fdb_replace", mac=mac, sticky=prior.sticky, vlan=vid, **common))
        elif now is not None and now.ifindex == decision.ifindex:
            # A learned entry elsewhere cannot be re-created; learning finds it again.
            ops.append(Op(kind="fdb_del", mac=mac, vlan=vid, **common))
    if before_membership is not None:
        ops.extend(plan_membership(common, before_membership, now_membership))
    return tuple(ops)


def _onoff(value):
    return "on" if value else "off"


def _vlan(op):
    return " vlan %d" % op.vlan if op.vlan else ""


def render(op):
    """The iproute2 command equivalent to ``op`` (for --dry-run and logs)."""
    if op.kind == "fdb_replace":
        return "bridge fdb replace %s dev %s master static%s%s" % (
            op.mac, op.port, " sticky" if op.sticky else "", _vlan(op))
    if op.kind == "fdb_del":
        return "bridge fdb del %s dev %s master%s" % (op.mac, op.port, _vlan(op))
    if op.kind == "flush":
        return "ip link set dev %s type bridge_slave fdb_flush" % op.port
    if op.kind == "vlan_add":
        return "bridge vlan add vid %d dev %s%s%s" % (op.vlan, op.port, " pvid" if op.pvid else "",
                                                      " untagged" if op.untagged else "")
    if op.kind == "vlan_del":
        return "bridge vlan del vid %d dev %s" % (op.vlan, op.port)
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
            words.append("fdb static%s added%s" % (" sticky" if op.sticky else "", _vlan(op)))
        elif op.kind == "fdb_del":
            words.append("fdb entry removed%s" % _vlan(op))
        elif op.kind == "flush":
            words.append("learned entries flushed")
        elif op.kind == "vlan_add":
            words.append("vlan %d%s added" % (op.vlan, " pvid untagged" if op.pvid else " tagged"))
        elif op.kind == "vlan_del":
            words.append("vlan %d removed" % op.vlan)
        else:
            if op.learning is not None:
                words.append("learning %s" % _onoff(op.learning))
            if op.flood is not None:
                words.append("flood %s" % _onoff(op.flood))
    return ", ".join(words) or "already in place"
