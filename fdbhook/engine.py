"""Apply, tear down, reconcile and repair: desired state, current state, plan, verify, roll back.

The hooks, the CLI and fdbhookd all come through here. Every path is the
same three steps on one port (``plan_converge``, ``execute_verified``): read the current state
(fdbhook.current), plan the difference (fdbhook.plan), execute it; verify =
read and plan again and expect nothing; on failure, plan back to the state
read before. One call handles one domain under the store's lock as one
transaction (fdbhook.txn): every port is planned first, the intent is written,
then the kernel, then the record. With ``on_error = fail`` a failure on any
NIC undoes the whole run; a failed record save undoes it too.
"""

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from fdbhook import plan as planner
from fdbhook import lockdown, txn
from fdbhook.current import locate, read_port
from fdbhook.errors import ApplyError, KernelError, StateError
from fdbhook.logsetup import nic_fields
from fdbhook.model import Decision, DesiredPort, DomainRecord, Nic, NicRecord, Op
from fdbhook.policy import decide_domain, refuse_foreign_ports
from fdbhook.resolve import load_networks

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class NicResult:
    decision: Decision
    status: str  # changed unchanged planned skipped failed held rolled back removed gone
    message: str
    ops: Tuple[Op, ...] = ()

    @property
    def failed(self):
        return self.status == "failed"


@dataclass(frozen=True)
class Report:
    driver: str
    domain: str
    results: Tuple[NicResult, ...]
    record: Optional[DomainRecord] = None

    @property
    def failures(self):
        return [r for r in self.results if r.failed]

    def one_line(self):
        """All failures on one line, for the hook's stderr."""
        return "; ".join("domain %s: NIC %s: %s" % (self.domain, r.decision.nic.label, r.message)
                         for r in self.failures)


def _log_line(driver, domain, result, action):
    d = result.decision
    head = "%s/%s: %s %s on %s" % (driver, domain, d.nic.label, d.port or "-", d.bridge or "-")
    # The journal gets the same line plus fields (journalctl FDBHOOK_DOMAIN=...).
    extra = nic_fields(driver, domain, d.nic.alias, d.nic.mac, d.port, d.bridge, action, result.status)
    if result.status == "failed":
        LOG.error("%s: FAILED: %s", head, result.message, extra=extra)
    elif result.status == "skipped":
        LOG.info("%s: skipped: %s", head, result.message, extra=extra)
    else:
        LOG.info("%s: %s", head, result.message, extra=extra)


class BridgeFacts:
    """Bridge links and VLAN filtering, read once per run (a resync reads each bridge once)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.links = {}
        self._filtering = {}
        self._sticky = {}

    def filtering(self, ifindex):
        if ifindex not in self._filtering:
            self._filtering[ifindex] = self.kernel.bridge_vlan_filtering(ifindex)
        return self._filtering[ifindex]

    def sticky(self, config, bridge, ifindex, network=None):
        """(sticky?, why) for guest entries on this bridge: config.sticky_for over its VXLAN ports, read once."""
        key = (ifindex, network)
        if key not in self._sticky:
            # Only "auto" depends on the ports: yes/no cost no kernel read.
            auto = config.sticky_setting(bridge, network)[0] == "auto"
            vxlan = tuple(link.name for link in self.kernel.vxlan_ports(ifindex)) if auto else ()
            self._sticky[key] = config.sticky_for(bridge, network, vxlan)
        return self._sticky[key]


# --- desired state ---------------------------------------------------------------

@dataclass(frozen=True)
class Security:
    """A NIC's MACs and lock mode, from its metadata and the config (metadata wins)."""

    extra_macs: Tuple[str, ...] = ()
    floating_macs: Tuple[str, ...] = ()
    locked: bool = False
    mab: bool = False


def nic_security(nic, config, bridge, network):
    """Merge metadata, [network NAME], [bridge NAME] and [manage] into a Security. Pure.

    Extra MACs and floating MACs add up; ``locked``/``mab`` take the most
    specific setting. Floating MACs cannot be static (they move) and a locked
    port drops a source MAC it has no entry for, so a NIC with floating MACs
    is never locked: its port keeps learning instead.
    """
    policies = [config.network_policy(network)] if network else []
    policies.append(config.bridge_policy(bridge))
    floating = []
    for mac in tuple(nic.floating_macs) + tuple(m for p in policies for m in p.floating_macs):
        if mac not in floating and mac != nic.mac:
            floating.append(mac)
    extra = []
    for mac in tuple(nic.extra_macs) + tuple(m for p in policies for m in p.extra_macs):
        if mac not in extra and mac != nic.mac and mac not in floating:
            extra.append(mac)

    def pick(nic_value, key, default):
        if nic_value is not None:
            return nic_value
        for policy in policies:
            if getattr(policy, key) is not None:
                return getattr(policy, key)
        return default

    locked = pick(nic.locked, "locked", config.locked) and not floating
    return Security(extra_macs=tuple(extra), floating_macs=tuple(floating), locked=locked,
                    mab=locked and pick(None, "mab", config.mab))


def desire(d, config, filtering, have_membership, paused, prev=None, sticky=True, security=None):
    """(DesiredPort, entry VIDs) for a managed NIC's decision. Pure; ApplyError if impossible.

    ``prev`` is the record of the same port (its entries are watched, so an
    old MAC or VLAN goes once the new one is in place); ``paused`` keeps the
    port locked down with no entries. Every MAC of ``security`` (primary and
    extra) gets an entry on every VLAN the port carries.
    """
    security = security or nic_security(d.nic, config, d.bridge, d.network)
    vlan, trunk = d.nic.vlan, d.nic.trunk
    if vlan is None and not trunk and d.network:
        policy = config.network_policy(d.network)
        vlan, trunk = policy.vlan, policy.trunk
    if (vlan or trunk) and not filtering:
        raise ApplyError(domain="?", nic=d.nic.label,
                         reason="VLANs requested but bridge %s has vlan_filtering off" % d.bridge)
    membership = planner.desired_membership(vlan, trunk) if vlan or trunk else None
    vids = planner.entry_vids(filtering, membership if membership is not None else have_membership)
    keys = frozenset((mac, vid) for mac in (d.nic.mac,) + security.extra_macs for vid in vids)
    watch = keys | (prev.keys if prev is not None else frozenset())
    was_locked, had_mab = (prev.locked, prev.mab) if prev is not None else (False, False)
    want = DesiredPort(port=d.port, ifindex=d.ifindex, bridge=d.bridge, bridge_ifindex=d.bridge_ifindex,
                       entries=frozenset() if paused else keys, watch=watch, sticky=sticky,
                       membership=membership, learning=bool(security.floating_macs) or security.mab,
                       locked=True if security.locked else (False if was_locked else None),
                       mab=True if security.mab else (False if had_mab else None))
    return want, vids


def desired_from_record(rec, bridge_ifindex, paused, sticky_supported=True):
    """The DesiredPort a record stands for: what drift repair restores and ``status`` checks."""
    keys = rec.keys
    return DesiredPort(port=rec.port, ifindex=rec.ifindex, bridge=rec.bridge, bridge_ifindex=bridge_ifindex,
                       entries=frozenset() if paused else keys, watch=keys,
                       sticky=rec.sticky and sticky_supported, membership=rec.set_vlans,
                       learning=bool(rec.floating_macs) or rec.mab,
                       locked=True if rec.locked else None, mab=True if rec.mab else None)


def released(rec, bridge_ifindex):
    """The DesiredPort of teardown: our entries gone, flags and VLANs as they were before us."""
    return DesiredPort(port=rec.port, ifindex=rec.ifindex, bridge=rec.bridge, bridge_ifindex=bridge_ifindex,
                       watch=rec.keys, learning=rec.prev_learning, flood=rec.prev_flood,
                       membership=rec.prev_vlans if rec.prev_vlans is not None else None,
                       locked=rec.prev_locked if rec.locked else None, mab=False if rec.mab else None)


# --- one port: plan, execute, verify, roll back ----------------------------------------

def _prefetch_domain(kernel, domain, record):
    """Everything a start or reconnect of ``domain`` will read, asked in one round trip.

    The ports by name, their bridges by name (the XML names them) and the
    entries of the NICs' MACs without a VLAN on bridges seen before (their
    ifindex is a guess the replies check); the recorded ports by ifindex,
    with their recorded entries and, where we set VLANs, their VLANs.
    """
    names, fdb, vxlan = [], [], []
    for nic in domain.nics:
        names.append(nic.target_dev)
        if nic.source_bridge:
            names.append(nic.source_bridge)
            bridge_ifindex = kernel.bridge_for(nic.source_bridge)
            if bridge_ifindex:
                vxlan.append(bridge_ifindex)
                if nic.mac:
                    fdb.extend((mac, bridge_ifindex, 0) for mac in (nic.mac,) + tuple(nic.extra_macs))
    recs = record.nics if record is not None else ()
    for rec in recs:
        bridge_ifindex = kernel.bridge_for(rec.bridge)
        if bridge_ifindex:
            fdb.extend((mac, bridge_ifindex, vid) for mac, vid in sorted(rec.keys))
    kernel.prefetch(names=[n for n in names if n], indexes=[rec.ifindex for rec in recs], fdb=fdb, vxlan=vxlan,
                    vlans=_recorded_vlan_ports(recs))


def _recorded_vlan_ports(recs):
    """The recorded ports whose VLANs a run will read: those on a VLAN-filtering bridge when recorded
    (entries on VLANs, or VLANs we set)."""
    return [rec.ifindex for rec in recs if rec.vids or rec.set_vlans is not None or rec.prev_vlans is not None]


def _prefetch_vlans(kernel, decisions, facts):
    """Every managed port of VLAN-filtering bridges: their VLANs in one round trip (one per domain).

    The same trip asks for the entries the NICs will have there, their VLANs
    guessed before they are read: the NIC's own (vlan, trunk), else VLAN 1, a
    bridge's default PVID. A wrong guess costs the port one more read later.
    """
    ports, fdb = [], []
    for d in decisions:
        if d.action == "manage" and d.ifindex and facts.filtering(d.bridge_ifindex):
            ports.append(d.ifindex)
            if d.nic.vlan or d.nic.trunk:
                vids = [vid for vid, _, _ in planner.desired_membership(d.nic.vlan, d.nic.trunk)]
            else:
                vids = [1]
            fdb.extend((mac, d.bridge_ifindex, vid) for mac in (d.nic.mac,) + tuple(d.nic.extra_macs) if mac
                       for vid in vids)
    kernel.prefetch(vlans=ports, fdb=fdb)


def rollback(kernel, want, before):
    """Put a port back as ``before`` (read before the failed change): True if done, errors logged."""
    try:
        txn.restore_port(kernel, want, before)
    except KernelError as exc:
        LOG.error("rollback of %s failed: %s", want.port, exc)
        return False
    return True


def plan_converge(kernel, want, link=None, flush=False, reserve=frozenset()):
    """(ops, state before) that bring one port to ``want``; nothing written. ApplyError if impossible.

    ``reserve``: keys that are not wanted now but must be free for later (the
    entries of an incoming migration, added at RESUMED when refusing is too
    late).
    """
    before = read_port(kernel, want, link)
    if not before.exists:
        raise ApplyError(domain="?", nic=want.port, reason="port %s vanished" % want.port)
    problems = planner.conflicts(replace(want, entries=want.entries | reserve) if reserve else want, before)
    if problems:
        raise ApplyError(domain="?", nic=want.port, reason=problems[0])
    return planner.plan_port(want, before, flush=flush), before


def execute_verified(kernel, want, ops, before, tx=None):
    """Send ``ops`` and verify (the plan again over a fresh read must be empty); on failure the port is
    rolled back to ``before`` and ApplyError says so. A failed rollback marks ``tx`` broken."""
    if not ops:
        return
    try:
        kernel.execute_many(ops)
        after = read_port(kernel, want)
        if not after.exists:
            raise ApplyError(domain="?", nic=want.port, reason="port %s vanished while being set up" % want.port)
        left = planner.drift(want, after)
        if left:
            raise ApplyError(domain="?", nic=want.port, reason="verify failed: " + ", ".join(left))
    except (KernelError, ApplyError) as exc:
        reason = exc.kwargs.get("reason") if isinstance(exc, ApplyError) else str(exc)
        if rollback(kernel, want, before):
            raise ApplyError(domain="?", nic=want.port, reason="%s; port restored" % reason) from None
        if tx is not None:
            tx.broken = True
        raise ApplyError(domain="?", nic=want.port,
                         reason="%s; restoring the port failed too, the next run retries" % reason) from None
    _log_takeovers(want, before)


def _log_takeovers(want, before):
    """Say so when a wanted entry replaced EVPN's remote entry (plan.entry_conflict allows only that one)."""
    for (mac, vid), entry in before.entries:
        if (mac, vid) in want.entries and entry is not None and entry.extern_learn and entry.on_vxlan \
                and entry.ifindex != want.ifindex:
            LOG.info("%s on %s: %s taken over from EVPN's remote entry on the VXLAN port (ifindex %d): "
                     "the guest has moved here", want.port, want.bridge, mac, entry.ifindex)


# --- domains -------------------------------------------------------------------------

def _new_record(d, want, vids, before, prev, have_membership, security):
    """The NIC's record after a successful apply (``prev``: the same port's record, kept)."""
    vids = tuple(vid for vid in vids if vid)
    # A kernel without the flags (CurrentPort None) locked nothing: nothing to undo.
    locked = bool(want.locked) and before.locked is not None
    lock = dict(extra_macs=security.extra_macs, floating_macs=security.floating_macs, locked=locked,
                mab=bool(want.mab) and locked and before.mab is not None)
    if prev is not None:
        keep_prev_vlans = prev.prev_vlans is not None or want.membership is None
        prev_locked = prev.prev_locked if prev.locked else bool(before.locked)
        return replace(prev, mac=d.nic.mac, config_mac=d.nic.config_mac, bridge=d.bridge, network=d.network,
                       prev_locked=prev_locked, **lock,
                       sticky=want.sticky, vids=vids, alias=d.nic.alias or prev.alias,
                       set_vlans=want.membership if want.membership is not None else prev.set_vlans,
                       prev_vlans=prev.prev_vlans if keep_prev_vlans else have_membership)
    return NicRecord(mac=d.nic.mac, port=d.port, ifindex=d.ifindex, bridge=d.bridge, network=d.network,
                     prev_learning=before.learning, prev_flood=before.flood, sticky=want.sticky,
                     applied=round(time.time(), 3), alias=d.nic.alias, vids=vids,
                     prev_vlans=have_membership if want.membership is not None else None,
                     set_vlans=want.membership, config_mac=d.nic.config_mac,
                     prev_locked=bool(before.locked), **lock)


def _plan_nic(kernel, config, d, prev, dry_run, facts, paused):
    """Plan one managed port (nothing written): (result, new record or None, (want, before, ops) or None)."""
    link = d.link if d.link is not None else kernel.by_index(d.ifindex)
    if link is None or not link.is_bridge_port:
        return NicResult(d, "failed", "port %s vanished" % d.port), None, None
    same_port = prev is not None and prev.ifindex == d.ifindex and prev.port == d.port
    prev = prev if same_port else None
    try:
        filtering = facts.filtering(d.bridge_ifindex)
        have_membership = kernel.port_vlans(d.ifindex) if filtering else ()
        security = nic_security(d.nic, config, d.bridge, d.network)
        sticky, _ = facts.sticky(config, d.bridge, d.bridge_ifindex, d.network)
        want, vids = desire(d, config, filtering, have_membership, paused, prev,
                            sticky=sticky and kernel.sticky_supported, security=security)
        # A port seen for the first time while paused (the destination of a live migration):
        # refuse now what the resume could not add, while the source still runs the guest.
        reserve = want.watch if paused and prev is None else frozenset()
        ops, before = plan_converge(kernel, want, link, flush=prev is None, reserve=reserve)
    except ApplyError as exc:
        return NicResult(d, "failed", exc.kwargs["reason"]), None, None
    except KernelError as exc:
        return NicResult(d, "failed", str(exc)), None, None
    message = planner.describe(ops)
    if prev is not None and prev.mac != d.nic.mac:
        message = "guest MAC changed %s -> %s: %s" % (prev.mac, d.nic.mac, message)
    if dry_run:
        return NicResult(d, "planned", message, ops), None, None
    if want.locked and before.locked is None:
        _lock_unsupported(d.bridge)
        message += " (not locked: this kernel has no locked bridge ports)"
    rec = _new_record(d, want, vids, before, prev, have_membership, security)
    return NicResult(d, "changed" if ops else "unchanged", message, ops), rec, (want, before, ops)


_LOCK_WARNED = set()


def _lock_unsupported(bridge):
    """Say once per bridge (and process) that lock mode is not available; managing goes on."""
    if bridge not in _LOCK_WARNED:
        _LOCK_WARNED.add(bridge)
        LOG.warning("bridge %s: lock mode asked for, but this kernel has no locked bridge ports "
                    "(IFLA_BRPORT_LOCKED, Linux >= 5.18); ports get their static entries, unlocked", bridge)


def claims(records, skip=None):
    """{MAC: (domain, NicRecord)} for every MAC with a static entry in ``records`` (skip: (driver, name))."""
    out = {}
    for record in records:
        if skip is not None and (record.driver, record.domain) == skip:
            continue
        for rec in record.nics:
            for mac in rec.macs:
                out.setdefault(mac, ("%s/%s" % (record.driver, record.domain), rec))
    return out


def refuse_claimed(domain, decisions, config, store, kernel):
    """Decisions with a MAC that another running NIC already has (here or in another domain) turned into errors.

    The kernel would let the second NIC take the entry over; the first guest
    would silently lose its traffic. Both NICs are named. A record whose
    port is gone (a guest that died without its release hook) claims nothing.
    A MAC the guest set itself (``currentAddress``) that another NIC holds is
    not taken: configured MACs claim first, and the NIC keeps its configured
    MAC (said once), so the owner keeps its traffic and a reconnect hook never
    fails over the guest's choice (libvirt would kill the guest).
    """
    others = claims(store.all(), skip=(domain.driver, domain.name))
    mine = {}
    out = {}
    order = sorted(range(len(decisions)), key=lambda i: decisions[i].nic.config_mac is not None)
    for i in order:
        d = decisions[i]
        if not d.managed:
            out[i] = d
            continue
        problem = _claim_problem(d, config, others, mine, kernel)
        refused = d.nic.config_mac and (problem or _taken_in_kernel(d, kernel))
        if refused:
            _guest_mac_refused(domain, d, refused)
            d = replace(d, nic=replace(d.nic, mac=d.nic.config_mac, config_mac=None))
            problem = _claim_problem(d, config, others, mine, kernel)
        for mac in (d.nic.mac,) + nic_security(d.nic, config, d.bridge, d.network).extra_macs:
            mine.setdefault(mac, d)
        out[i] = replace(d, action="error", reason=problem, link=None) if problem else d
    return tuple(out[i] for i in range(len(decisions)))


def _claim_problem(d, config, others, mine, kernel):
    """Why ``d`` may not have its MACs (held by a live NIC of another domain, or of this one), or None."""
    security = nic_security(d.nic, config, d.bridge, d.network)
    for mac in (d.nic.mac,) + security.extra_macs:
        kind = "MAC" if mac == d.nic.mac else "extra MAC"
        if mac in others and locate(kernel, others[mac][1]) is not None:
            owner, rec = others[mac]
            return "%s %s is already in use by domain %s NIC %s (%s on %s), refused" % (
                kind, mac, owner, rec.alias or rec.port, rec.mac, rec.port)
        if mac in mine and mine[mac] is not d:
            other = mine[mac]
            return "%s %s is already in use by NIC %s of this domain (%s), refused" % (
                kind, mac, other.nic.label, other.port)
    return None


def _taken_in_kernel(d, kernel):
    """Why the bridge will not give ``d``'s MAC to its port (someone's static entry elsewhere), or None."""
    for vid in sorted({0, d.nic.vlan or 0}):
        entry = kernel.fdb_get(d.nic.mac, d.bridge_ifindex, vid)
        reason = planner.entry_conflict(d.port, d.ifindex, d.nic.mac, entry, False)
        if reason:
            return reason
    return None


_GUEST_MAC_WARNED = set()


def _guest_mac_refused(domain, d, problem):
    key = (domain.driver, domain.name, d.nic.alias, d.nic.mac)
    if key not in _GUEST_MAC_WARNED:
        _GUEST_MAC_WARNED.add(key)
        LOG.warning("%s/%s: %s: the MAC the guest set itself is not followed: %s; its port keeps the "
                    "configured MAC %s", domain.driver, domain.name, d.nic.label, problem, d.nic.config_mac)


def _policy_for(config, bridge, network):
    """A [network NAME] section that sets vlan_filtering wins over [bridge NAME]."""
    if network:
        policy = config.network_policy(network)
        if policy.vlan_filtering != "leave":
            return policy
    return config.bridge_policy(bridge)


def ensure_bridge_policy(kernel, store, config, bridge, bridge_ifindex, network=None, switched=None):
    """Apply the bridge's vlan_filtering policy as a transaction (fdbhook.txn.switch_bridge).

    The bridge's state-before is recorded (pending) before the one kernel
    request. With ``switched`` (a list: apply_domain) the bridge's name is
    added and the switch stays pending until the domain operation settles it
    (kept if a managed guest uses the bridge, else undone); without it (the
    network hook) it is settled at once. Where the kernel cannot filter VLANs
    it says so once (per bridge) and fdbhook goes on managing ports. Returns
    a short note or None.
    """
    policy = _policy_for(config, bridge, network)
    if policy.vlan_filtering == "leave":
        return None
    want = policy.vlan_filtering == "on"
    current = kernel.bridge_vlan_filtering(bridge_ifindex)
    if current == want:
        return None
    rec = store.load_bridge(bridge)
    if rec is not None and rec.get("ifindex") != bridge_ifindex:
        rec = None  # the bridge was re-created: the old record means nothing
    if rec is not None and rec.get("unsupported") and want:
        return "kernel cannot filter VLANs on %s" % bridge
    # Capability from the probe (IFLA_BR_VLAN_PROTOCOL), never from an error of the request: an
    # EINVAL of the switch on a kernel that can filter is a failure like any other.
    if want and not kernel.vlan_filtering_capable(bridge_ifindex):
        LOG.warning("bridge %s: cannot turn VLAN filtering on: this kernel lacks CONFIG_BRIDGE_VLAN_FILTERING; "
                    "managing ports anyway, the uplink stays promiscuous", bridge)
        store.save_bridge(bridge, {"bridge": bridge, "ifindex": bridge_ifindex, "unsupported": True})
        return "kernel cannot filter VLANs on %s" % bridge
    try:
        txn.switch_bridge(kernel, store, bridge, bridge_ifindex, current, want, policy.restore_vlan_filtering, rec)
    except KernelError:
        txn.settle_bridges(kernel, store, [bridge])  # the request failed: the pending record rolls back
        raise
    LOG.info("bridge %s: vlan_filtering %s (was %s)", bridge, "on" if want else "off", "on" if current else "off")
    if switched is None:
        txn.settle_bridges(kernel, store, [bridge], keep=True)
    else:
        switched.append(bridge)
    return None


def _restore_bridge(kernel, store, name, rec):
    """Put a bridge no managed guest uses back as it was: the undo is a transaction too (pending first)."""
    bridge = rec.get("bridge", name)
    link = kernel.by_index(rec.get("ifindex"))
    same = link is not None and link.name == bridge and link.kind == "bridge"
    if same and rec.get("restore", True) and "prev_vlan_filtering" in rec \
            and kernel.bridge_vlan_filtering(link.ifindex) != bool(rec["prev_vlan_filtering"]):
        store.save_bridge(name, dict(rec, pending=True))
        txn.settle_bridges(kernel, store, [name])  # not in use: put back, then the record goes
        return
    if not same or "prev_vlan_filtering" in rec:
        store.remove_bridge(bridge)


def release_bridges(kernel, store):
    """Restore vlan_filtering on bridges that no longer carry a managed guest (store lock held)."""
    in_use = {nic.bridge for record in store.all() for nic in record.nics}
    for name in store.bridge_names():
        try:
            rec = store.load_bridge(name)
        except Exception:
            continue
        if rec is not None and rec.get("bridge") not in in_use:
            _restore_bridge(kernel, store, name, rec)


def _port_key(rec):
    return (rec.port, rec.ifindex)


def _previous(kept, d):
    """The record of this NIC: the same port first (a guest MAC change), else the same MAC."""
    rec = kept.get((d.port, d.ifindex))
    if rec is not None:
        return rec
    return next((r for r in kept.values() if r.mac == d.nic.mac), None)


def _kept_records(kernel, record, prune):
    """Records to carry over: a NIC whose port is gone is dropped (``prune``)."""
    if record is None:
        return {}
    out = {}
    for rec in record.nics:
        if prune:
            link = kernel.by_index(rec.ifindex)
            if link is None or link.name != rec.port:
                continue
        out[_port_key(rec)] = rec
    return out


def _recover(kernel, store, driver, name):
    """Finish or roll back interrupted operations first; refuse this domain if its own cannot be (lock held)."""
    txn.refuse_unrecovered(txn.recover(kernel, store), driver, name, store)


def _commit(kernel, tx, record, executed, changed=True):
    """Save the record and drop the intent; a failed save rolls back every executed port and raises."""
    try:
        tx.commit(record, changed=changed)
    except StateError as exc:
        for want, before in executed:
            if not rollback(kernel, want, before):
                tx.broken = True
        if not tx.broken:
            try:
                tx.close()
            except StateError:
                pass  # the intent stays: the next run rolls back again (nothing left to do) and drops it
        raise StateError(path=exc.kwargs.get("path"), reason="%s; changes undone" % exc.kwargs.get("reason")) \
            from None


def _plan_domain(kernel, config, decisions, kept, hold, dry_run, paused):
    """(results, planned) for every decision, nothing written; ``kept`` gets the planned records."""
    facts = BridgeFacts(kernel)
    if not hold:
        _prefetch_vlans(kernel, decisions, facts)
    results, planned = [], []
    for d in decisions:
        if d.action != "manage" or hold:
            status = {"skip": "skipped", "error": "failed"}.get(d.action, "held")
            message = d.reason if status != "held" else "not applied: another NIC of the domain failed"
            results.append(NicResult(d, status, message))
            continue
        old = _previous(kept, d)
        result, rec, todo = _plan_nic(kernel, config, d, old, dry_run, facts, paused)
        results.append(result)
        if rec is not None:
            if old is not None:
                kept.pop(_port_key(old), None)
            kept[_port_key(rec)] = rec
            planned.append((len(results) - 1, d, todo, old, rec))
    return results, planned


def _execute_planned(kernel, tx, planned, results, kept, kept_before, fail):
    """Execute planned NICs in order: (records to keep, [(want, before)] executed). Updates ``results``.

    With ``fail`` (on_error = fail) the first failure rolls back every port
    done so far and holds the rest; else the failed NIC keeps its old record.
    """
    executed = []
    for n, (i, d, (want, before, ops), old, rec) in enumerate(planned):
        try:
            execute_verified(kernel, want, ops, before, tx)
        except ApplyError as exc:
            results[i] = NicResult(d, "failed", exc.kwargs["reason"])
            if fail:
                for want2, before2 in reversed(executed):
                    if not rollback(kernel, want2, before2):
                        tx.broken = True
                for j, d2, (_, _, ops2), _, _ in planned[:n]:
                    results[j] = NicResult(d2, "rolled back" if ops2 else "held",
                                           "undone: another NIC of the domain failed")
                for j, d2, _, _, _ in planned[n + 1:]:
                    results[j] = NicResult(d2, "held", "not applied: another NIC of the domain failed")
                return dict(kept_before), []
            kept.pop(_port_key(rec), None)
            if old is not None:
                kept[_port_key(old)] = old
            continue
        if ops:
            executed.append((want, before))
    return kept, executed


def apply_domain(domain, config, kernel, store, dry_run=False, paused=None, prune=True):
    """Manage every NIC of ``domain`` that policy says is ours.

    Idempotent: a second run sends nothing when the kernel already matches.
    A NIC whose port has a record with another MAC is a guest MAC change: the
    new entries go in, then the old ones out, flags untouched.
    ``paused`` True: lock the ports down but keep the MACs out of the FDB
    (incoming migration, suspended guest); None keeps the record's state.
    ``prune`` False (one hot-plugged NIC) keeps the record's other NICs
    without checking each port again. Never raises for one NIC's failure;
    StateError when the intent or the record cannot be written (then nothing
    is changed).
    """
    networks = load_networks([n.source_network for n in domain.nics if n.type == "network"],
                             config.network_dirs)
    with store.lock():
        if not dry_run:
            _recover(kernel, store, domain.driver, domain.name)
        kernel.forget()
        record = store.load(domain.driver, domain.name)
        _prefetch_domain(kernel, domain, record)
        if paused is None:
            paused = record.paused if record is not None else False
        decisions = refuse_claimed(domain, decide_domain(domain, config, networks, kernel, record), config, store,
                                   kernel)
        checked = refuse_foreign_ports(domain, decisions, config, store.all(), kernel,
                                       lambda d: nic_security(d.nic, config, d.bridge, d.network).extra_macs)
        # ports refused as not this guest's own: never touched, not even to end another guest's lock-down
        foreign = {d.port for d, was in zip(checked, decisions) if was.managed and not d.managed}
        decisions = checked
        kept = _kept_records(kernel, record, prune)
        # Bad input (an error decision) stops the run before any change,
        # unless the admin chose on_error = continue.
        hold = config.on_error == "fail" and any(d.action == "error" for d in decisions)
        switched = []
        try:
            if not hold and not dry_run:
                for bridge, ifindex, network in sorted({(d.bridge, d.bridge_ifindex, d.network or "")
                                                        for d in decisions if d.managed}):
                    try:
                        ensure_bridge_policy(kernel, store, config, bridge, ifindex, network or None, switched)
                    except KernelError as exc:  # every NIC on that bridge fails, with the reason
                        reason = "bridge %s: setting vlan_filtering failed: %s" % (bridge, exc)
                        decisions = tuple(replace(d, action="error", reason=reason, link=None)
                                          if d.managed and d.bridge == bridge else d for d in decisions)
                hold = config.on_error == "fail" and any(d.action == "error" for d in decisions)
            results, new_record = _apply_planned(domain, config, kernel, store, decisions, record, kept, hold,
                                                 dry_run, paused, foreign)
        finally:
            if switched:  # kept if a guest now uses the bridge, else put back (a refused start changes nothing)
                txn.settle_bridges(kernel, store, switched)
    for result in results:
        if not dry_run:
            _log_line(domain.driver, domain.name, result, "apply")
    return Report(domain.driver, domain.name, tuple(results), new_record)


def _apply_planned(domain, config, kernel, store, decisions, record, kept, hold, dry_run, paused, foreign=()):
    """Plan every NIC, write the intent, execute, commit: (results, new record). Store lock held. ``foreign``:
    ports refused as not the guest's (a pending one among them stays locked down for its own guest)."""
    kept_before = dict(kept)
    results, planned = _plan_domain(kernel, config, decisions, kept, hold, dry_run, paused)
    # Read after every port was (see fdbhook.lockdown.lock_down): a port seen locked down has its pending record.
    pending = lockdown.originals(store)
    planned = _with_originals(kernel, planned, kept, pending)
    fail = config.on_error == "fail"
    if fail and not dry_run and any(r.failed for r in results):
        # a NIC could not even be planned: nothing is written
        for i, d, _, _, _ in planned:
            results[i] = NicResult(d, "held", "not applied: another NIC of the domain failed")
        kept, planned = kept_before, []

    def record_of(nics):
        return DomainRecord(driver=domain.driver, domain=domain.name, uuid=domain.uuid,
                            nics=tuple(sorted(nics.values(), key=lambda r: r.mac)), paused=paused)

    new_record = record_of(kept)
    if not dry_run:
        tx = txn.Transaction(store, domain.driver, domain.name, record)
        tx.begin(new_record, [(want, before) for _, _, (want, before, ops), _, _ in planned if ops])
        kept, executed = _execute_planned(kernel, tx, planned, results, kept, kept_before, fail)
        new_record = record_of(kept)
        # A domain that was already right (a repeated hook, the join and the start hook of one port)
        # writes nothing: its record and second copy already say this.
        _commit(kernel, tx, new_record, executed,
                changed=not new_record.nics or new_record != record or not store.is_saved(new_record))
        lockdown.drop_claimed(store, new_record, pending)
        lockdown.release_unclaimed(kernel, store, {n.target_dev: (n.mac, n.config_mac) for n in domain.nics
                                                   if n.target_dev and n.target_dev not in foreign},
                                   new_record, pending)
    return results, new_record


def _with_originals(kernel, planned, kept, pending):
    """A new record of a port locked down at its join (fdbhook.lockdown) gets, as its state-before, the
    state the port had before the lock-down (the intent keeps the state read: a rollback leaves the port
    locked down, its pending record still there). A predicted entry the NIC does not want (a wrong
    prediction, another VLAN) is watched too: the plan takes it out after the NIC's own went in."""
    if not pending:
        return planned
    out = []
    for i, d, todo, old, rec in planned:
        original = pending.get(rec.ifindex)
        fresh = old is None or (old.ifindex, old.port) != (rec.ifindex, rec.port)
        if fresh and original is not None and original[0] == rec.port:
            rec = replace(rec, prev_learning=original[1], prev_flood=original[2])
            kept[_port_key(rec)] = rec
            want = todo[0]
            stale = original[3] - want.entries - want.watch
            if stale:
                want = replace(want, watch=want.watch | stale)
                try:
                    ops, before = plan_converge(kernel, want, flush=True)
                    todo = (want, before, ops)
                except (ApplyError, KernelError) as exc:  # the port went (or the read failed): the verify says
                    LOG.debug("%s: predicted entries not replanned: %s", rec.port, exc)
        out.append((i, d, todo, old, rec))
    return out


def recorded_decision(rec, bridge_ifindex=None, link=None):
    """A 'manage' Decision that names a recorded NIC (for reports and log lines)."""
    nic = Nic(index=0, type="recorded", mac=rec.mac, config_mac=rec.config_mac, alias=rec.alias or rec.port)
    return Decision(nic=nic, action="manage", reason="recorded", port=rec.port, ifindex=rec.ifindex,
                    bridge=rec.bridge, bridge_ifindex=bridge_ifindex, network=rec.network, link=link)


def _plan_teardown_nic(kernel, rec):
    """(result or None, (decision, want, before, ops) or None) for one recorded NIC at teardown."""
    where = locate(kernel, rec)
    if where is None:
        return NicResult(recorded_decision(rec), "gone", "port gone, nothing to undo"), None
    link, bridge = where
    d = recorded_decision(rec, bridge.ifindex, link)
    want = released(rec, bridge.ifindex)
    try:
        before = read_port(kernel, want, link)
    except KernelError as exc:
        return NicResult(d, "failed", str(exc)), None
    return None, (d, want, before, planner.plan_port(want, before))


def _execute_teardown(kernel, tx, planned, results, left):
    """Tear down planned NICs; a failed one is put back (managed) and kept in ``left``. Returns what was done."""
    executed = []
    for i, rec, (d, want, before, ops) in planned:
        try:
            if ops:
                kernel.execute_many(ops)
                executed.append((want, before))
            results[i] = NicResult(d, "removed", planner.describe(ops), ops)
        except KernelError as exc:
            if locate(kernel, rec) is None:
                results[i] = NicResult(d, "gone", "port vanished during teardown")
                continue
            restored = rollback(kernel, want, before)
            tx.broken = tx.broken or not restored
            results[i] = NicResult(d, "failed", "%s; %s" % (exc, "port left managed" if restored
                                                             else "restoring failed, the next run retries"))
            left.append(rec)
    return executed


def _begin_teardown(store, record, left, planned):
    """The teardown's transaction, its intent written: StateError if it cannot be, unless the teardown is whole.

    A full or read-only state dir at stopped: the record alone says how to
    finish a whole teardown (it goes last, by an unlink, which a full disk
    allows), so a run killed meanwhile is finished by the next teardown.
    """
    tx = txn.Transaction(store, record.driver, record.domain, record)
    try:
        tx.begin(replace(record, nics=tuple(left)), [(want, before) for _, _, (_, want, before, ops) in planned if ops])
    except StateError as exc:
        if left:
            raise
        LOG.warning("%s/%s: no intent (%s): tearing down from the record alone", record.driver, record.domain, exc)
    return tx


def teardown_domain(driver, name, kernel, store, dry_run=False, macs=None):
    """Undo what the record of ``driver/name`` says we applied.

    Ports that are gone took their entries with them; ports that are not ours
    any more (re-created, moved) are left alone. ``macs`` limits teardown to
    some NICs (device detach). A NIC whose teardown fails is put back as it
    was (managed) and keeps its record.
    """
    with store.lock():
        if not dry_run:
            _recover(kernel, store, driver, name)
        kernel.forget()
        record = store.load(driver, name)
        if record is None:
            return Report(driver, name, ())
        fdb = [(mac, kernel.bridge_for(rec.bridge), vid) for rec in record.nics for mac, vid in sorted(rec.keys)]
        kernel.prefetch(names=sorted({rec.bridge for rec in record.nics}), indexes=[rec.ifindex for rec in record.nics],
                        fdb=[key for key in fdb if key[1]],  # VLANs: only where teardown puts them back
                        vlans=[rec.ifindex for rec in record.nics if rec.prev_vlans is not None])
        results, left, planned = [], [], []
        for rec in record.nics:
            if macs is not None and rec.mac not in macs:
                left.append(rec)
                continue
            result, todo = _plan_teardown_nic(kernel, rec)
            if todo is None:
                results.append(result)
                if result.failed:
                    left.append(rec)
                continue
            d, want, before, ops = todo
            if dry_run:
                results.append(NicResult(d, "planned", planner.describe(ops), ops))
                left.append(rec)
                continue
            results.append(None)
            planned.append((len(results) - 1, rec, todo))
        if not dry_run:
            # the switched bridges this may leave unused: their undo is pending before anything changes
            marked = txn.mark_bridges(store, {rec.bridge for rec in record.nics if rec not in left})
            try:
                tx = _begin_teardown(store, record, left, planned)
                executed = _execute_teardown(kernel, tx, planned, results, left)
                left.sort(key=lambda r: record.nics.index(r))
                _commit(kernel, tx, replace(record, nics=tuple(left)), executed)
            finally:
                if marked:
                    txn.settle_bridges(kernel, store, marked)
            release_bridges(kernel, store)
    for result in results:
        if not dry_run:
            _log_line(driver, name, result, "teardown")
    return Report(driver, name, tuple(results), replace(record, nics=tuple(left)))


def _plan_reapply_nic(kernel, rec, paused, facts):
    """(result or None, rec to keep or None, (decision, want, before, ops) or None) for one recorded NIC."""
    where = locate(kernel, rec, facts.links)
    if where is None:
        return NicResult(recorded_decision(rec), "gone", "port gone, record dropped"), None, None
    link, bridge = where
    d = recorded_decision(rec, bridge.ifindex, link)
    want = desired_from_record(rec, bridge.ifindex, paused, kernel.sticky_supported)
    try:
        ops, before = plan_converge(kernel, want, link)
    except ApplyError as exc:
        return NicResult(d, "failed", exc.kwargs["reason"]), rec, None
    except KernelError as exc:
        return NicResult(d, "failed", str(exc)), rec, None
    return None, rec, (d, want, before, ops)


def reapply_record(driver, name, kernel, store, config, paused=None, facts=None, recover=True):
    """Bring a domain's recorded ports back to their recorded state, from the record alone.

    The daemon's drift repair and pause/resume handling: no XML, no libvirt.
    NICs whose port is gone are dropped from the record. ``paused`` True/False
    also changes the record's state (entries out/in). ``facts`` caches
    bridge facts across calls (a full resync). Returns the Report.
    """
    with store.lock():
        if recover:
            _recover(kernel, store, driver, name)
        kernel.forget()
        record = store.load(driver, name)
        if record is None:
            return Report(driver, name, ())
        paused = record.paused if paused is None else paused
        results, planned, new_record = _plan_reapply(kernel, record, paused, facts or BridgeFacts(kernel))
        tx = txn.Transaction(store, driver, name, record)
        tx.begin(new_record, [(want, before) for _, (_, want, before, ops) in planned if ops])
        executed = _execute_reapply(kernel, tx, planned, results)
        # an unchanged record is not rewritten (resync of 1000 ports)
        _commit(kernel, tx, new_record, executed, changed=new_record != record)
    return _reapply_report(driver, name, results, new_record)


def _plan_reapply(kernel, record, paused, facts):
    """(results, planned, new record) of bringing ``record``'s ports to it (``paused``: entries out). Nothing
    written; a result is None where ``planned`` holds (its index, (decision, want, before, ops))."""
    fdb = [(mac, kernel.bridge_for(rec.bridge), vid) for rec in record.nics for mac, vid in sorted(rec.keys)]
    kernel.prefetch(indexes=[rec.ifindex for rec in record.nics], fdb=[key for key in fdb if key[1]],
                    vlans=[rec.ifindex for rec in record.nics if rec.set_vlans is not None])  # what repair checks
    results, kept, planned = [], [], []
    for rec in record.nics:
        result, rec, todo = _plan_reapply_nic(kernel, rec, paused, facts)
        results.append(result)
        if rec is not None:
            kept.append(rec)
        if todo is not None:
            planned.append((len(results) - 1, todo))
    return results, planned, replace(record, nics=tuple(kept), paused=paused)


def _execute_reapply(kernel, tx, planned, results):
    """Send and verify the planned ports (``results`` filled in); returns [(want, before)] of those changed."""
    executed = []
    for i, (d, want, before, ops) in planned:
        try:
            execute_verified(kernel, want, ops, before, tx)
        except ApplyError as exc:
            results[i] = NicResult(d, "failed", exc.kwargs["reason"])
            continue
        if ops:
            executed.append((want, before))
        results[i] = NicResult(d, "changed" if ops else "unchanged", planner.describe(ops), ops)
    return executed


def _reapply_report(driver, name, results, record):
    for result in results:
        if result.status != "unchanged":
            _log_line(driver, name, result, "reapply")
    return Report(driver, name, tuple(results), record)


# --- an incoming guest's resume, planned ahead: its first frame costs only the kernel writes ----------

@dataclass(frozen=True)
class Armed:
    """A paused record's resume, planned and its intent written ahead (``arm_record``)."""

    driver: str
    name: str
    token: dict  # txn.arm_token(): whose it is
    stamp: tuple  # Store.stamp once written: anything else writing the record or the intent changes it
    record: DomainRecord
    new_record: DomainRecord
    planned: tuple
    results: tuple
    store: object  # the Store it was written to
    lock_fd: int  # its lock file, open until fired or disarmed (Store.lock(fd): one flock at the frame)


def arm_record(driver, name, kernel, store):
    """Plan the resume of ``driver/name``'s paused record and write its intent now, armed.

    fdbhookd on the destination of a live migration: the guest's first
    frame (fire_armed) then costs the kernel writes alone, the intent that
    covers them being on disk already. An armed intent is left alone by
    every recovery while the process that armed it lives (txn.armed_alive);
    once it is gone, recovery finishes or rolls it back like any other.
    Returns None when there is nothing to arm (no paused record, nothing to
    write, a NIC that cannot be planned). StateError: nothing armed.
    """
    lock_fd = store.lock_file()
    try:
        item = _arm(driver, name, kernel, store, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise
    if item is None:
        os.close(lock_fd)
    return item


def _arm(driver, name, kernel, store, lock_fd):
    with store.lock(lock_fd):
        _recover(kernel, store, driver, name)
        kernel.forget()
        record = store.load(driver, name)
        if record is None or not record.paused:
            return None
        results, planned, new_record = _plan_reapply(kernel, record, False, BridgeFacts(kernel))
        ports = [(want, before) for _, (_, want, before, ops) in planned if ops]
        if not ports or any(result is not None and result.status == "failed" for result in results):
            return None
        token = txn.arm_token()
        try:
            store.save_intent(driver, name, dict(txn.intent_to_json(driver, name, record, new_record, ports),
                                                 armed=token))
        except StateError:
            txn.disarmed(token)
            raise
        return Armed(driver, name, token, store.stamp(driver, name), record, new_record, tuple(planned),
                     tuple(results), store, lock_fd)


def fire_armed(armed, kernel, marks=None):
    """The armed plan's kernel writes, then its record; the intent goes. Returns the Report, or None (the
    armed intent is no longer there as written: another operation ran meanwhile; nothing done).
    ``marks``: a dict that gets the monotonic times the store lock was held ("locked"), the stamp
    checked ("checked") and the kernel writes done ("written")."""
    store = armed.store
    marks = {} if marks is None else marks
    try:
        with store.lock(armed.lock_fd):
            marks["locked"] = time.monotonic()
            stamp = store.stamp(armed.driver, armed.name)
            marks["checked"] = time.monotonic()
            if stamp != armed.stamp:
                if stamp[0] == armed.stamp[0]:  # the intent is still ours, the record changed: it goes
                    store.remove_intent(armed.driver, armed.name)
                return None
            tx = txn.Transaction(store, armed.driver, armed.name, armed.record)
            tx.open = True  # its intent: written when it was armed
            kernel.forget()
            results = list(armed.results)
            executed = _execute_reapply(kernel, tx, armed.planned, results)
            marks["written"] = time.monotonic()
            _commit(kernel, tx, armed.new_record, executed)
    finally:
        txn.disarmed(armed.token)
        os.close(armed.lock_fd)
    return _reapply_report(armed.driver, armed.name, results, armed.new_record)


def disarm(armed):
    """The armed guest's frame will not come (RESUMED did it, a stop, a port gone), or its record changed
    since: its intent goes if it is still the one written. StateError: it stays, and the next recovery
    (no longer alive) drops it."""
    store = armed.store
    try:
        with store.lock(armed.lock_fd):
            if store.stamp(armed.driver, armed.name)[0] == armed.stamp[0]:  # still the intent written
                store.remove_intent(armed.driver, armed.name)
    finally:
        txn.disarmed(armed.token)
        os.close(armed.lock_fd)


def resync(kernel, store, config):
    """Compare every managed port with its record and the kernel; repair drift.

    Returns (ports checked, repairs made, failures).
    """
    checked = repaired = failed = 0
    facts = BridgeFacts(kernel)
    with store.lock():
        left = txn.recover(kernel, store)
        store.clean_temp_files()  # what a writer killed outside any transaction left
    for record in store.all():
        if (record.driver, record.domain) in left:
            failed += len(record.nics)
            continue
        report = reapply_record(record.driver, record.domain, kernel, store, config, facts=facts, recover=False)
        for result in report.results:
            checked += 1
            repaired += result.status in ("changed", "gone")
            failed += result.failed
    with store.lock():
        release_bridges(kernel, store)
    return checked, repaired, failed


def reconcile(domain, live_paused, config, kernel, store, alias=None, port=None, trust_live=False):
    """Make a domain's ports match its live XML (fdbhookd: hotplug, unplug, MAC change, sync).

    With ``alias`` (DEVICE_ADDED, NIC_MAC_CHANGE) or ``port`` (a link event)
    only that NIC is applied: a hotplug must not cost more with every NIC
    the guest already has. A domain with a record keeps its recorded pause
    state (only SUSPENDED/RESUMED change it, so a start's brief ``-S`` pause
    never removes an entry the start hook just added, and an incoming
    migration gets none before it resumes) unless ``trust_live`` (a full sync
    after reconnecting, when events may have been missed).
    NICs of the record that the live XML no longer has (by MAC or port) are
    torn down. Returns the apply Report or None.
    """
    record = store.load(domain.driver, domain.name)
    if live_paused is None:
        # libvirt's own pause on the way up: a start's -S (the record says running) or an
        # incoming migration (the record, or the migrate hook's mark, says paused until RESUMED)
        paused = record.paused if record is not None else store.is_incoming(domain.driver, domain.name)
    else:
        paused = live_paused if record is None or trust_live else record.paused
    report = None
    if alias or port:
        only = tuple(n for n in domain.nics if (alias and n.alias == alias) or (port and n.target_dev == port))
        if only:
            report = apply_domain(replace(domain, nics=only), config, kernel, store, paused=bool(paused),
                                  prune=False)
    else:
        report = apply_domain(domain, config, kernel, store, paused=bool(paused))
    record = store.load(domain.driver, domain.name)
    if record is not None:
        live = {n.mac for n in domain.nics} | {n.target_dev for n in domain.nics if n.target_dev}
        gone = {rec.mac for rec in record.nics if rec.mac not in live and rec.port not in live}
        if gone:
            teardown_domain(domain.driver, domain.name, kernel, store, macs=gone)
    return report


def prune_port(kernel, store, config, ifindex):
    """A managed port vanished (unplug; libvirt sends no DEVICE_REMOVED for LXC): drop its record."""
    for record in store.all():
        if any(nic.ifindex == ifindex for nic in record.nics):
            reapply_record(record.driver, record.domain, kernel, store, config)


def stale_records(store, driver, running, max_age, now=None):
    """Records of ``driver`` domains not in ``running``, older than ``max_age`` seconds (maybe mid-start)."""
    now = time.time() if now is None else now
    out = []
    for record in store.all():
        if record.driver != driver or record.domain in running:
            continue
        newest = max((nic.applied for nic in record.nics), default=0.0)
        if now - newest > max_age:
            out.append(record)
    return out



def announce_to_frr(kernel, store, frr):
    """Tell FRR's zebra again of every running guest's entry on a VXLAN bridge that it does not know.

    zebra learns a local MAC only from the kernel's RTM_NEWNEIGH, and only
    for a port it already knows as a bridge member. FRR 10 (Debian 13) takes
    link messages through its dataplane thread, so on a loaded host the
    notice of a new tap's entry can be handled before the tap's own
    RTM_NEWLINK: zebra drops the MAC (its log: "Rx RTM_NEWNEIGH ... IF 5",
    then "RTM_NEWLINK ADD for vnet0(5)"), the kernel never says it again, and
    the guest is never advertised. ``frr``: a function returning an
    evpn.FrrView, asked only when some running guest has a port on a bridge
    with a VXLAN port. A MAC FRR knows in any way (local, remote,
    duplicate) is left to it; for one it does not know at all, our static
    entries on our port are announced again (Kernel.announce: the entry does
    not change). Returns (entries announced, MACs FRR did not know).
    """
    vxlan = {}
    wanted = []
    for record in store.all():
        if record.paused:
            continue
        for nic in record.nics:
            if nic.bridge not in vxlan:
                link = kernel.by_name(nic.bridge)
                vxlan[nic.bridge] = bool(link is not None and kernel.vxlan_ports(link.ifindex))
            if vxlan[nic.bridge]:
                wanted += [(nic, mac) for mac in nic.macs]
    if not wanted:
        return 0, 0
    view = frr()
    if not view.ok:
        return 0, 0
    unknown = [(nic, mac) for nic, mac in wanted if not view.macs.get(mac.lower())]
    if not unknown:
        return 0, 0
    with store.lock():  # no apply or teardown between reading our entries and touching them
        entries = []
        for nic, mac in unknown:
            link = kernel.by_index(nic.ifindex)
            if link is None or link.name != nic.port:
                continue
            entries += [e for e in kernel.port_entries(nic.ifindex)
                        if e.mac == mac.lower() and e.static and not e.extern_learn and not e.local]
        announced = kernel.announce(entries)
    LOG.log(logging.INFO if announced else logging.DEBUG, "EVPN: FRR did not know %s: announced %d entries again",
             ", ".join(sorted({mac for _, mac in unknown})), announced)
    return announced, len(unknown)
