"""Lock-down at the join: a guest's port whose NIC nobody knows yet stops learning and flooding at once.

fdbhookd's link monitor sees a port join a managed bridge within a
millisecond; the NIC's MAC comes from libvirt tens of ms later (a hotplug).
A port that is unmistakably libvirt's guest port (fdbhook.joined.decide_lockdown)
gets learning and unicast flood off meanwhile, and a static entry for the
MAC the port predicts (fdbhook.joined.predicted_mac) when that MAC has no
entry on the bridge yet and no NIC fdbhookd knows has it. That is a change of
kernel state, so it is a transaction of its own:

1. the port's original state (learning, flood) goes durably into a *pending*
   record, ``STATE/pending/IFINDEX.json``, with the bound it may stay locked
   (``until``), why it was locked and the predicted entry (``entries``),
   after a second copy (``STATE/pending.prev/``) that takes its place if the
   record is found damaged later, as a domain record's does;
2. one netlink send: learning and flood off, the port's learned entries
   flushed; then one more: the predicted entry (if the kernel refuses it,
   all is undone like any refusal).

Any later run settles it (``settle``, called by ``txn.recover``, so by every
hook, daemon job, resync and ``status``, and by the link monitor at the
bound): a port a domain record now holds was *claimed* (the apply took it
over; its record's state-before is the pending record's original state, and
a predicted entry that is not the NIC's is one of the entries it takes out,
see ``originals``), the pending record goes; a port that is gone or left the
bridge needs nothing; a port past its bound (or every port, at fdbhookd's
start) is put back as it was, predicted entry out, then the record goes. So
a port is always managed with a record, or locked down with a pending record
that says how it was, or exactly as it was.
"""

import logging
import time

from fdbhook import plan as planner
from fdbhook.current import read_port
from fdbhook.errors import FdbhookError, KernelError, StateError
from fdbhook.joined import JoinedPort, Lockdown, decide_lockdown, predicted_mac
from fdbhook.model import CurrentPort, DesiredPort, normalize_mac, tap_made_by_libvirt

LOG = logging.getLogger(__name__)

FORMAT = 1


def pending_record(link, bridge, bridge_ifindex, why, now, bound, keys=frozenset()):
    """The pending record of a port about to be locked down (JSON-ready). Pure."""
    return {"format": FORMAT, "port": link.name, "ifindex": link.ifindex, "bridge": bridge,
            "bridge_ifindex": bridge_ifindex, "learning": bool(link.learning), "flood": bool(link.flood),
            "since": round(now, 3), "until": round(now + bound, 3), "why": why,
            "entries": [[mac, vid] for mac, vid in sorted(keys)]}


def parse_pending(ifindex, data):
    """(port, bridge_ifindex, learning, flood, until, predicted entries) of a pending record; ValueError if
    malformed. Pure. A record written before predictions (no ``entries``) has none."""
    try:
        if data.get("format") != FORMAT or int(data["ifindex"]) != ifindex:
            raise ValueError("not a pending record of ifindex %d" % ifindex)
        keys = frozenset((normalize_mac(str(mac)), int(vid)) for mac, vid in data.get("entries") or ())
        if any(mac is None or not 0 <= vid <= 4094 for mac, vid in keys):
            raise ValueError("entries: not a MAC, or a VLAN out of range")
        return (str(data["port"]), int(data["bridge_ifindex"]), bool(data["learning"]), bool(data["flood"]),
                float(data["until"]), keys)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError("malformed pending record: %s" % (exc,)) from None


def _want(port, ifindex, bridge, bridge_ifindex, entries=frozenset(), watch=frozenset()):
    """The locked-down port: learning and flood off, the predicted ``entries`` (plain static: the NIC's apply
    makes them sticky if its bridge wants that), ``watch``: predicted entries that go; nothing else touched."""
    return DesiredPort(port=port, ifindex=ifindex, bridge=bridge, bridge_ifindex=bridge_ifindex, entries=entries,
                       watch=entries | watch, sticky=False)


def lockdown_ops(link, bridge, bridge_ifindex, keys):
    """(learning and flood off and the flush, then the predicted entries): the lock-down's two sends. Pure.

    Not plan_port's order, entries first: this port carries no guest
    traffic yet, and learning and flood off is what must not wait for the
    entries' round trip.
    """
    have = CurrentPort(port=link.name, ifindex=link.ifindex, exists=True, learning=bool(link.learning),
                       flood=bool(link.flood))
    off = planner.plan_port(_want(link.name, link.ifindex, bridge, bridge_ifindex), have, flush=True)
    locked = CurrentPort(port=link.name, ifindex=link.ifindex, exists=True, learning=False, flood=False)
    return off, planner.plan_port(_want(link.name, link.ifindex, bridge, bridge_ifindex, entries=keys), locked)


def predicted_keys(kernel, link, bridge_ifindex, mac, taken):
    """(mac, vid) for the entry ``mac`` predicted for ``link`` (a port being locked down): one per VLAN the
    port carries on a VLAN-filtering bridge, none without VLANs. Empty unless ``mac`` is free: no NIC
    fdbhookd knows has it (``taken``), and no entry for it on the bridge but what the port itself learned."""
    if not mac or mac in taken:
        return frozenset()
    kernel.prefetch(indexes=[bridge_ifindex], fdb=[(mac, bridge_ifindex, 0)])
    vids = (0,)
    if kernel.bridge_vlan_filtering(bridge_ifindex):
        vids = tuple(vid for vid, _, _ in kernel.port_vlans(link.ifindex))
        kernel.prefetch(fdb=[(mac, bridge_ifindex, vid) for vid in vids])
    for vid in vids:
        entry = kernel.fdb_get(mac, bridge_ifindex, vid)
        if entry is not None and not (entry.dynamic and entry.ifindex == link.ifindex):
            return frozenset()
    return frozenset((mac, vid) for vid in vids)


def lock_down(kernel, store, config, link, bridge, bridge_ifindex, peer=None, target_devs=frozenset(),
              now=None, read_now=True, taken=frozenset(), marks=None):
    """Decide and, if so, lock ``link`` (a port that just joined ``bridge``) down. Returns the Lockdown decision.

    Without the store's lock, so that no apply in progress (another port's)
    delays it: the pending record is written before the kernel, and an apply
    reads a port before it reads the pending records (``originals``), so an
    apply that sees the port locked down also sees its original state. A
    port that neither learns nor floods is not touched (an apply got there
    first). StateError: the pending record could not be written, nothing
    changed. A request the kernel refuses is undone at once (decision: not
    locked); KernelError only when that fails too (the pending record stays;
    the next settle restores). ``read_now`` False: the caller read ``link``
    from ``kernel`` just now, its cache answers (one round trip less).
    ``taken``: MACs of the NICs the caller knows (never predicted for this port). ``marks``: a dict that
    gets the monotonic times it decided, wrote the pending record, and sent each of its two sends
    ("decided", "recorded", "flags", "entry").
    """
    marks = {} if marks is None else marks
    bound = config.hotplug_lockdown
    if read_now:  # else the caller read it just now (kernel's cache)
        kernel.forget()
    link = kernel.by_index(link.ifindex)
    if link is None or not link.is_bridge_port or link.master != bridge_ifindex:
        return Lockdown(False, "it left the bridge")
    if not link.learning and not link.flood:
        return Lockdown(False, "it neither learns nor floods")
    records = store.all()
    recorded = next(("%s/%s" % (r.driver, r.domain) for r in records for nic in r.nics
                     if nic.ifindex == link.ifindex), None)
    if store.has_pending_port(link.ifindex):
        return Lockdown(False, "already locked down")
    joined = JoinedPort(link.name, link.kind, link.mac, bridge,
                        peer.mac if peer is not None else None, peer.kind if peer is not None else None)
    facts = dict(uplink=config.uplink(link.name), recorded=recorded, target_devs=target_devs)
    decision = decide_lockdown(joined, **facts)
    if decision.lock:  # only then the one FDB dump: static entries of anyone on it
        foreign = [e.mac for e in kernel.port_entries(link.ifindex) if not e.local and not e.dynamic]
        decision = decide_lockdown(joined, foreign_entries=foreign, **facts)
    if not decision.lock:
        return decision
    keys = _prediction(kernel, config, link, joined, bridge_ifindex, set(taken) | {
        mac for r in records for nic in r.nics for mac in nic.macs})
    marks["decided"] = time.monotonic()
    now = time.time() if now is None else now
    store.save_pending(link.ifindex, pending_record(link, bridge, bridge_ifindex, decision.why, now, bound, keys))
    marks["recorded"] = time.monotonic()
    try:
        for ops, mark in zip(lockdown_ops(link, bridge, bridge_ifindex, keys), ("flags", "entry")):
            kernel.execute_many(ops)
            marks[mark] = time.monotonic()
    except KernelError as exc:
        # Put back at once; if that fails too, the pending record stays for the next settle.
        kernel.forget()
        restore(kernel, link.name, link.ifindex, None, bridge_ifindex, bool(link.learning), bool(link.flood), keys)
        store.remove_pending(link.ifindex)
        return Lockdown(False, "the kernel refused it (%s); left as it was" % exc)
    if keys:
        return Lockdown(True, "%s; entry %s predicted" % (decision.why, sorted(keys)[0][0]))
    return decision


def _prediction(kernel, config, link, joined, bridge_ifindex, taken):
    """The predicted entries of a port being locked down (predicted_keys); none if the config says so or a
    read for them fails (the lock-down itself still goes on)."""
    if not config.hotplug_predict:
        return frozenset()
    try:
        return predicted_keys(kernel, link, bridge_ifindex, predicted_mac(joined), taken)
    except KernelError as exc:
        LOG.warning("%s joined %s: no predicted entry: %s", link.name, joined.bridge, exc)
        return frozenset()


def originals(store):
    """{ifindex: (port, learning, flood, predicted keys)} of every pending port: the apply's state-before for
    those ports, and the entries it must take out unless the NIC wants them."""
    out = {}
    for ifindex, data in store.pending(parse_pending):
        if data is not None:
            port, _, learning, flood, _, keys = parse_pending(ifindex, data)
            out[ifindex] = (port, learning, flood, keys)
    return out


def drop_claimed(store, record, pending):
    """After an apply's commit: the pending records of the ports ``record`` now holds go (errors: the next
    settle drops them)."""
    if not pending or record is None:
        return
    for nic in record.nics:
        if pending.get(nic.ifindex, (None,))[0] == nic.port:
            try:
                store.remove_pending(nic.ifindex)
                LOG.debug("%s: claimed by %s/%s after its lock-down", nic.port, record.driver, record.domain)
            except StateError as exc:
                LOG.error("%s", exc)


def release_unclaimed(kernel, store, names, record, pending):
    """After an apply: a pending port named by one of the domain's NICs (``names``: {target dev: the NIC's
    MACs}) that the apply did not take (the NIC is opted out, skipped, refused) is put back now, not at its
    bound; never a tap libvirt made for another NIC (its lock-down waits for that NIC, whatever this XML
    says)."""
    held = {nic.ifindex for nic in record.nics} if record is not None else set()
    todo = {i for i, (port, _, _, _) in (pending or {}).items()
            if port in names and i not in held and tap_made_by_libvirt(kernel.by_index(i), names[port]) is not False}
    if todo:
        settle(kernel, store, only=todo, everything=True)


def settle(kernel, store, now=None, only=None, everything=False):
    """Finish or undo pending lock-downs (store lock held). Returns {ifindex: what was done}.

    ``only``: these ifindexes; ``everything``: put back every port nobody
    claimed, whatever its bound (fdbhookd's start: the monitor that waited
    for its NIC is gone, and a sync applies what libvirt still knows).
    Errors are logged and leave the pending record for the next run.
    """
    now = time.time() if now is None else now
    entries = [(i, d) for i, d in store.pending(parse_pending) if only is None or i in only]
    if not entries:
        return {}
    held = {(nic.ifindex, nic.port): "%s/%s" % (r.driver, r.domain) for r in store.all() for nic in r.nics}
    done = {}
    for ifindex, data in entries:
        try:
            if data is None:  # both copies bad and quarantined; store.pending logged it, the port is not touched
                store.remove_pending(ifindex)
                done[ifindex] = "bad record quarantined"
                continue
            port, bridge_ifindex, learning, flood, until, keys = parse_pending(ifindex, data)
            owner = held.get((ifindex, port))
            if owner:
                store.remove_pending(ifindex)
                done[ifindex] = "claimed by %s" % owner
                continue
            kernel.forget()
            link = kernel.by_index(ifindex)
            if link is None or link.name != port or not link.is_bridge_port or link.master != bridge_ifindex:
                store.remove_pending(ifindex)
                done[ifindex] = "gone"
                continue
            if not everything and now <= until:
                continue
            restore(kernel, port, ifindex, link, bridge_ifindex, learning, flood, keys)
            store.remove_pending(ifindex)
            done[ifindex] = "restored"
            LOG.info("%s: no NIC claimed it after its lock-down; learning %s, flood %s again (as before)%s",
                     port, "on" if learning else "off", "on" if flood else "off",
                     ", predicted entry removed" if keys else "")
        except FdbhookError as exc:
            LOG.error("pending port %d: settling failed: %s", ifindex, exc)
    return done


def restore(kernel, port, ifindex, link, bridge_ifindex, learning, flood, keys=frozenset()):
    """Put a locked-down port's learning and flood back as they were, its predicted entries ``keys`` out;
    verified. KernelError if not."""
    bridge = kernel.by_index(bridge_ifindex)
    want = _want(port, ifindex, bridge.name if bridge is not None else "?", bridge_ifindex, watch=keys)
    target = planner.restore_state(want, CurrentPort(port=port, ifindex=ifindex, exists=True, learning=learning,
                                                     flood=flood))
    ops = planner.plan_port(target, read_port(kernel, target, link))
    if not ops:
        return
    kernel.execute_many(ops)
    left = planner.drift(target, read_port(kernel, target))
    if left:
        raise KernelError(what="restoring %s" % port, reason="still " + ", ".join(left))


def describe(store, now=None):
    """The pending ports for ``status``: [{port, ifindex, bridge, why, since, until, learning, flood,
    predicted}]."""
    now = time.time() if now is None else now
    out = []
    for ifindex, data in store.pending(parse_pending):
        if data is None:
            out.append({"ifindex": ifindex, "port": None, "why": "bad record, no good second copy (quarantined)"})
            continue
        port, _, learning, flood, until, keys = parse_pending(ifindex, data)
        out.append({"port": port, "ifindex": ifindex, "bridge": data.get("bridge"), "why": data.get("why"),
                    "since": data.get("since"), "until": until, "left_s": round(max(0.0, until - now), 1),
                    "learning": learning, "flood": flood,
                    "predicted": [{"mac": mac, "vlan": vid} for mac, vid in sorted(keys)]})
    return out
