"""Desired port state vs current port state -> ordered kernel operations. Pure.

One function, ``plan_port``, serves every path: apply, verify (plan again
and expect nothing), rollback (plan back to the state read before), pause
and resume, a guest MAC change, teardown, drift repair and ``status`` (the
plan of a record against the kernel; empty means healthy).

Order matters for a guest that is passing traffic; the plan always emits:
  1. VLANs the port must gain (an entry on a VLAN the port lacks is refused),
  2. unicast flood back on and the port unlocked (MAB off), if wanted
     (teardown: before any entry goes, so the guest is never locked out),
  3. the static entries that are missing (primary and extra MACs),
  4. learning and flood off, and the lock (with MAB: learning on) in one
     request (the MACs are in the FDB by then),
  5. entries of ours that must go (an old MAC, a paused guest, teardown),
  6. VLANs the port must lose,
  7. learning back on, if wanted,
  8. flush of what the port learned (after learning is off, or it learns again).
So at no point is a MAC the guest uses neither in the FDB nor flooded to it:
a MAC change adds the new entry before the old one goes, flags untouched.

Lock mode: ``locked`` / ``mab`` None in the DesiredPort leave the flags alone;
a port whose kernel reports no ``locked`` flag (CurrentPort.locked None) is
never locked or unlocked (the engine says so once).

VLANs: VID 0 means "no VLAN" everywhere (the only choice on a bridge without
VLAN filtering); on a filtering bridge one entry per VLAN the port carries,
never VID 0 plus every VLAN.
"""

from fdbhook.model import DesiredPort, Op


def entry_conflict(port, ifindex, mac, entry, owned):
    """Why we must not take over ``entry`` for ``mac``, or None if we may.

    A learned (dynamic) entry on another port is the kernel's guess and may be
    replaced. So may a remote EVPN MAC: an extern_learn entry on a VXLAN port
    of the same bridge is how FRR's zebra says "this MAC lives on another
    host", and when our guest has moved here (migration) that is out of date.
    Any other static, local or externally learned entry belongs to someone else.
    """
    if entry is not None and entry.local and entry.ifindex == ifindex:
        # A local (permanent) entry is the host's own address: never replaced or deleted, on our port neither.
        return "MAC %s is a local (permanent) FDB entry of the host on %s, never replaced; refusing it" % (mac, port)
    if entry is None or entry.ifindex == ifindex or entry.dynamic or owned:
        return None
    if entry.extern_learn and entry.on_vxlan:
        return None
    kind = "local" if entry.local else ("externally learned" if entry.extern_learn else "static")
    where = " on VLAN %d" % entry.vlan if entry.vlan else ""
    return "MAC %s already has a %s FDB entry%s on another port (ifindex %d), not ours; refusing to move it to %s" % (
        mac, kind, where, entry.ifindex, port)


def conflicts(want, have, owned=frozenset()):
    """Reasons the wanted entries of ``want`` cannot be put on its port (``owned``: keys we hold elsewhere)."""
    out = []
    for key in sorted(want.entries):
        reason = entry_conflict(want.port, want.ifindex, key[0], have.entry(key), key in owned)
        if reason and reason not in out:
            out.append(reason)
    return out


def desired_membership(vlan, trunk):
    """((vid, pvid, untagged), ...) for an access VLAN and tagged trunk VLANs."""
    want = {vid: (False, False) for vid in trunk}
    if vlan:
        want[vlan] = (True, True)
    return tuple((vid,) + want[vid] for vid in sorted(want))


def entry_vids(filtering, membership):
    """The VLANs a port's static entries must exist on (0 = no VLAN)."""
    if not filtering:
        return (0,)
    return tuple(vid for vid, _, _ in membership) or (0,)


def _membership_ops(common, want, have):
    """(adds, removals) that turn membership ``have`` into exactly ``want``."""
    have_map = {vid: (pvid, untagged) for vid, pvid, untagged in have}
    adds = [Op(kind="vlan_add", vlan=vid, pvid=pvid, untagged=untagged, **common)
            for vid, pvid, untagged in want if have_map.get(vid) != (pvid, untagged)]
    wanted = {vid for vid, _, _ in want}
    removals = [Op(kind="vlan_del", vlan=vid, **common) for vid, _, _ in have if vid not in wanted]
    return adds, removals


def plan_port(want, have, flush=False):
    """Ops that turn ``have`` (CurrentPort) into ``want`` (DesiredPort), in safe order.

    A port that is not there any more (``have.exists`` False) gets nothing:
    its entries went with it, and a re-created port may be somebody else's.
    ``flush`` asks for the learned entries to be flushed even if the port
    does not learn now (a port seen for the first time).
    """
    if not have.exists:
        return ()
    common = dict(port=want.port, ifindex=want.ifindex, bridge=want.bridge, bridge_ifindex=want.bridge_ifindex)
    vlan_adds, vlan_dels = [], []
    if want.membership is not None and have.membership is not None:
        vlan_adds, vlan_dels = _membership_ops(common, want.membership, have.membership)
    ops = list(vlan_adds)
    want_locked = want.locked if have.locked is not None else None
    want_mab = want.mab if have.mab is not None else None
    unlock = want_locked is False and bool(have.locked)
    # The kernel refuses to unlock a port while MAB is on: both go together.
    mab_off = bool(have.mab) and (want_mab is False or unlock)
    flood_on = want.flood and not have.flood
    if flood_on or unlock or mab_off:
        ops.append(Op(kind="set_flags", flood=True if flood_on else None, locked=False if unlock else None,
                      mab=False if mab_off else None, **common))
    for mac, vid in sorted(want.entries):
        entry = have.entry((mac, vid))
        if not have.owns((mac, vid)) or entry.sticky != want.sticky:
            ops.append(Op(kind="fdb_replace", mac=mac, vlan=vid, sticky=want.sticky, **common))
    learning_off = have.learning and not want.learning
    flood_off = have.flood and not want.flood
    lock = bool(want_locked) and not have.locked
    mab_on = bool(want_mab) and not have.mab and bool(want_locked)
    # MAB needs learning on in the same request that turns it on.
    learning_on = want.learning and not have.learning
    early_learning = mab_on and learning_on
    if learning_off or flood_off or lock or mab_on:
        ops.append(Op(kind="set_flags", learning=False if learning_off else (True if early_learning else None),
                      flood=False if flood_off else None, locked=True if lock else None,
                      mab=True if mab_on else None, **common))
    for mac, vid in sorted(want.watch - want.entries):
        if have.owns((mac, vid)):
            ops.append(Op(kind="fdb_del", mac=mac, vlan=vid, **common))
    ops.extend(vlan_dels)
    if learning_on and not early_learning:
        ops.append(Op(kind="set_flags", learning=True, **common))
    if (flush or learning_off) and not want.learning:
        # Whatever the port learned (peers' MACs, a forged source) goes now.
        ops.append(Op(kind="flush", **common))
    return tuple(ops)


def _additive(op):
    """Does ``op`` only add (an entry, a VLAN, flood back on, the port unlocked)? Nothing later depends on more."""
    if op.kind in ("fdb_replace", "vlan_add"):
        return True
    return op.kind == "set_flags" and op.learning is None and op.flood is not False and not op.locked and not op.mab


def stages(ops):
    """One port's ops split where later requests depend on earlier ones: [[additive...], [the rest...]].

    The kernel goes on after a failed message of one send; learning/flood off,
    the lock, removals and the flush must not follow a failed entry or VLAN
    add, so they go in a second send only when the first one fully succeeded.
    """
    ops = list(ops)
    first = next((i for i, op in enumerate(ops) if not _additive(op)), len(ops))
    return [stage for stage in (ops[:first], ops[first:]) if stage]


def restore_state(want, before):
    """The DesiredPort that puts a port back exactly as ``before`` (a CurrentPort) after a failed apply."""
    mine = frozenset(key for key, _ in before.entries if before.owns(key))
    sticky = any(entry.sticky for key, entry in before.entries if key in mine)
    touch_lock = want.locked is not None or want.mab is not None
    return DesiredPort(port=want.port, ifindex=want.ifindex, bridge=want.bridge, bridge_ifindex=want.bridge_ifindex,
                       entries=mine, watch=frozenset(want.keys), sticky=sticky, learning=before.learning,
                       flood=before.flood, membership=before.membership if want.membership is not None else None,
                       locked=bool(before.locked) if touch_lock else None,
                       mab=bool(before.mab) if touch_lock else None)


def drift(want, have):
    """What is wrong with a port, in words (empty: healthy). The plan, described."""
    if not have.exists:
        return ["port gone"]
    words = []
    for op in plan_port(want, have):
        where = " on VLAN %d" % op.vlan if op.vlan else ""
        if op.kind == "fdb_replace":
            if have.owns((op.mac, op.vlan)):
                words.append("entry for %s%s %s sticky" % (op.mac, where, "not" if op.sticky else "unexpectedly"))
            else:
                words.append("static entry for %s%s missing" % (op.mac, where))
        elif op.kind == "fdb_del":
            words.append("entry for %s%s present but not wanted" % (op.mac, where))
        elif op.kind in ("vlan_add", "vlan_del"):
            if "VLAN membership differs" not in words:
                words.append("VLAN membership differs")
        elif op.kind == "set_flags":
            if op.learning is not None:
                words.append("learning %s" % _onoff(not op.learning))
            if op.flood is not None:
                words.append("flood %s" % _onoff(not op.flood))
            if op.locked is not None:
                words.append("port %s" % ("unlocked" if op.locked else "locked"))
            if op.mab is not None:
                words.append("mab %s" % _onoff(not op.mab))
    return words


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
    if op.kind == "bridge_set":
        return "ip link set dev %s type bridge vlan_filtering %d" % (op.port, int(op.vlan_filtering))
    if op.kind == "set_flags":
        parts = []
        if op.learning is not None:
            parts.append("learning %s" % _onoff(op.learning))
        if op.flood is not None:
            parts.append("flood %s" % _onoff(op.flood))
        if op.locked is not None:
            parts.append("locked %s" % _onoff(op.locked))
        if op.mab is not None:
            parts.append("mab %s" % _onoff(op.mab))
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
            if op.locked is not None:
                words.append("port %s" % ("locked" if op.locked else "unlocked"))
            if op.mab is not None:
                words.append("mab %s" % _onoff(op.mab))
    return ", ".join(words) or "already in place"
