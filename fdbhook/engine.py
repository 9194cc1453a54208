"""Apply and tear down: plan, execute, verify, roll back, record.

The hooks, the CLI and (later) the daemon all come through here. One call
handles one domain under the store's lock; every managed NIC is its own
transaction: if any step for a port fails, that port is put back exactly as
it was and the failure is reported, naming domain, NIC and reason.
"""

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from fdbhook import plan as planner
from fdbhook.errors import ApplyError, KernelError
from fdbhook.model import Decision, DomainRecord, Membership, NicRecord, Op, PortState
from fdbhook.policy import decide_domain
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


def _where(d):
    return "%s on %s" % (d.port or "-", d.bridge or "-")


def _log_line(driver, domain, result):
    d = result.decision
    head = "%s/%s: %s %s" % (driver, domain, d.nic.label, _where(d))
    if result.status == "failed":
        LOG.error("%s: FAILED: %s", head, result.message)
    elif result.status == "skipped":
        LOG.info("%s: skipped: %s", head, result.message)
    else:
        LOG.info("%s: %s", head, result.message)


@dataclass(frozen=True)
class Target:
    """Everything one managed port should end up with."""

    vids: Tuple[Optional[int], ...]  # entry VLANs, None = VID 0
    membership: Optional[Membership]  # VLAN membership to set, None = leave
    sticky: bool
    entries: bool = True  # False while the guest is paused


@dataclass(frozen=True)
class Before:
    """A port as it was, enough to put it back."""

    state: PortState
    entries: dict
    membership: Membership


def _entries(kernel, d, vids):
    return {vid: kernel.fdb_get(d.nic.mac, d.bridge_ifindex, vid) for vid in vids}


def _verify(kernel, d, target):
    link = kernel.by_index(d.ifindex)
    if link is None or link.name != d.port:
        raise ApplyError(domain="?", nic=d.nic.label, reason="port %s vanished while being set up" % d.port)
    problems = []
    if link.learning:
        problems.append("learning still on")
    if link.flood:
        problems.append("flood still on")
    for vid, entry in _entries(kernel, d, target.vids).items():
        where = " on VLAN %d" % vid if vid else ""
        if not target.entries:
            if entry is not None and entry.ifindex == d.ifindex and entry.static:
                problems.append("FDB entry%s still present while paused" % where)
        elif entry is None or entry.ifindex != d.ifindex or not entry.static:
            problems.append("static FDB entry%s missing" % where)
        elif target.sticky and not entry.sticky:
            problems.append("FDB entry%s not sticky" % where)
    if target.membership is not None and kernel.port_vlans(d.ifindex) != target.membership:
        problems.append("VLAN membership differs")
    if problems:
        raise ApplyError(domain="?", nic=d.nic.label, reason="verify failed: " + ", ".join(problems))


def _rollback(kernel, d, before, target):
    try:
        now_entries = _entries(kernel, d, target.vids)
        now_membership = kernel.port_vlans(d.ifindex) if target.membership is not None else ()
    except KernelError:
        now_entries, now_membership = {vid: None for vid in target.vids}, ()
    restore_membership = before.membership if target.membership is not None else None
    for op in planner.plan_restore(d, before.state, before.entries, now_entries, restore_membership,
                                   now_membership):
        try:
            kernel.execute(op)
        except KernelError as exc:
            LOG.error("rollback of %s failed: %s", d.port, exc)


def _target(kernel, config, d, bridges):
    """VLANs and membership for a managed NIC; raises ApplyError if impossible."""
    if d.bridge_ifindex not in bridges:
        bridges[d.bridge_ifindex] = kernel.bridge_info(d.bridge_ifindex)
    filtering, _ = bridges[d.bridge_ifindex]
    vlan, trunk = d.nic.vlan, d.nic.trunk
    if vlan is None and not trunk and d.network:
        policy = config.network_policy(d.network)
        vlan, trunk = policy.vlan, policy.trunk
    sticky = config.sticky and kernel.sticky_supported
    if not filtering:
        if vlan or trunk:
            raise ApplyError(domain="?", nic=d.nic.label,
                             reason="VLANs requested but bridge %s has vlan_filtering off" % d.bridge)
        return Target(vids=(None,), membership=None, sticky=sticky), ()
    have = kernel.port_vlans(d.ifindex)
    if vlan or trunk:
        membership = planner.desired_membership(vlan, trunk)
        return Target(vids=planner.entry_vids(True, membership), membership=membership, sticky=sticky), have
    return Target(vids=planner.entry_vids(True, have), membership=None, sticky=sticky), have


def _apply_nic(kernel, config, d, prev_rec, dry_run, bridges, paused=False):
    """Bring one managed port to its desired state.

    Returns (result, new record or None, Before or None).
    """
    mac = d.nic.mac
    link = d.link if d.link is not None else kernel.by_index(d.ifindex)
    if link is None or not link.is_bridge_port:
        return NicResult(d, "failed", "port %s vanished" % d.port), None, None
    try:
        target, have = _target(kernel, config, d, bridges)
    except ApplyError as exc:
        return NicResult(d, "failed", exc.kwargs["reason"]), None, None
    target = replace(target, entries=not paused)
    before = Before(state=PortState(learning=bool(link.learning), flood=bool(link.flood)),
                    entries=_entries(kernel, d, target.vids), membership=have)
    same_port = prev_rec is not None and prev_rec.ifindex == d.ifindex and prev_rec.port == d.port
    for entry in before.entries.values():
        owned = same_port and entry is not None and entry.ifindex == prev_rec.ifindex
        conflict = planner.entry_conflict(d.port, d.ifindex, mac, entry, owned)
        if conflict:
            return NicResult(d, "failed", conflict), None, None
    ops = planner.plan_apply(d, before.state, before.entries, target.sticky, first_time=not same_port,
                             membership=target.membership, have_membership=have, want_entries=not paused)
    if dry_run:
        return NicResult(d, "planned", planner.describe(ops), ops), None, None
    try:
        for op in ops:
            kernel.execute(op)
        if target.sticky and not kernel.sticky_supported:
            target = replace(target, sticky=False)
        if ops:  # nothing sent: what was just read is the verification
            _verify(kernel, d, target)
    except (KernelError, ApplyError) as exc:
        _rollback(kernel, d, before, target)
        reason = exc.kwargs.get("reason") if isinstance(exc, ApplyError) else str(exc)
        return NicResult(d, "failed", "%s; port restored" % reason, ops), None, None
    vids = tuple(vid or 0 for vid in target.vids if vid)
    if same_port:
        rec = replace(prev_rec, bridge=d.bridge, network=d.network, sticky=target.sticky, vids=vids,
                      set_vlans=target.membership if target.membership is not None else prev_rec.set_vlans,
                      prev_vlans=prev_rec.prev_vlans if prev_rec.prev_vlans is not None or target.membership is None
                      else have)
    else:
        rec = NicRecord(mac=mac, port=d.port, ifindex=d.ifindex, bridge=d.bridge, network=d.network,
                        prev_learning=before.state.learning, prev_flood=before.state.flood,
                        sticky=target.sticky, applied=round(time.time(), 3), alias=d.nic.alias, vids=vids,
                        prev_vlans=have if target.membership is not None else None,
                        set_vlans=target.membership)
    return NicResult(d, "changed" if ops else "unchanged", planner.describe(ops), ops), rec, (before, target)


def _policy_for(config, bridge, network):
    """A [network NAME] section that sets vlan_filtering wins over [bridge NAME]."""
    if network:
        policy = config.network_policy(network)
        if policy.vlan_filtering != "leave":
            return policy
    return config.bridge_policy(bridge)


def ensure_bridge_policy(kernel, store, config, bridge, bridge_ifindex, network=None):
    """Apply the bridge's vlan_filtering policy; remember what it was before.

    Where the kernel cannot filter VLANs it says so once (per bridge) and
    fdbhook goes on managing ports. Returns a short note or None.
    """
    policy = _policy_for(config, bridge, network)
    if policy.vlan_filtering == "leave":
        return None
    want = policy.vlan_filtering == "on"
    current, _ = kernel.bridge_info(bridge_ifindex)
    rec = store.load_bridge(bridge)
    if rec is not None and rec.get("ifindex") != bridge_ifindex:
        rec = None  # the bridge was re-created: the old record means nothing
    if current == want:
        return None
    if rec is not None and rec.get("unsupported") and want:
        return "kernel cannot filter VLANs on %s" % bridge
    try:
        kernel.set_vlan_filtering(bridge_ifindex, want)
    except KernelError as exc:
        if exc.kwargs.get("errno") in (95, 22) and want:  # EOPNOTSUPP, EINVAL
            LOG.warning("bridge %s: cannot turn VLAN filtering on (%s): this kernel lacks "
                        "CONFIG_BRIDGE_VLAN_FILTERING; managing ports anyway, the uplink stays promiscuous",
                        bridge, exc.kwargs.get("reason"))
            store.save_bridge(bridge, {"bridge": bridge, "ifindex": bridge_ifindex, "unsupported": True})
            return "kernel cannot filter VLANs on %s" % bridge
        raise
    LOG.info("bridge %s: vlan_filtering %s (was %s)", bridge, "on" if want else "off", "on" if current else "off")
    if rec is None or "prev_vlan_filtering" not in rec:
        rec = {"bridge": bridge, "ifindex": bridge_ifindex, "prev_vlan_filtering": current}
    rec.update(set_vlan_filtering=want, restore=policy.restore_vlan_filtering)
    store.save_bridge(bridge, rec)
    return None


def release_bridges(kernel, store):
    """Restore vlan_filtering on bridges that no longer carry a managed guest."""
    in_use = {nic.bridge for record in store.all() for nic in record.nics}
    bridge_dir = os.path.dirname(store.bridge_path("x"))
    try:
        names = [n[:-5] for n in os.listdir(bridge_dir) if n.endswith(".json") and not n.startswith(".")]
    except FileNotFoundError:
        return
    for name in names:
        try:
            rec = store.load_bridge(name)
        except Exception:
            continue
        if rec is None or rec.get("bridge") in in_use:
            continue
        bridge = rec.get("bridge", name)
        link = kernel.by_index(rec.get("ifindex"))
        if (link is not None and link.name == bridge and rec.get("restore", True)
                and "prev_vlan_filtering" in rec):
            try:
                kernel.set_vlan_filtering(link.ifindex, rec["prev_vlan_filtering"])
                LOG.info("bridge %s: vlan_filtering restored to %s (last managed guest gone)", bridge,
                         "on" if rec["prev_vlan_filtering"] else "off")
            except KernelError as exc:
                LOG.error("bridge %s: restoring vlan_filtering failed: %s", bridge, exc)
                continue
        if link is None or link.name != bridge or "prev_vlan_filtering" in rec:
            store.remove_bridge(bridge)


def _still_there(kernel, rec):
    link = kernel.by_index(rec.ifindex)
    return link is not None and link.name == rec.port


def apply_domain(domain, config, kernel, store, dry_run=False, paused=None, prune=True):
    """Manage every NIC of ``domain`` that policy says is ours.

    Idempotent: a second run sends nothing when the kernel already matches.
    ``paused`` True: lock the ports down but keep the MACs out of the FDB
    (incoming migration, suspended guest); None keeps the record's state.
    ``prune`` False (the daemon applying one hot-plugged NIC) keeps the
    record's other NICs without checking each port again.
    Returns a Report; never raises for a single NIC's failure.
    """
    networks = load_networks([n.source_network for n in domain.nics if n.type == "network"],
                             config.network_dirs)
    with store.lock():
        record = store.load(domain.driver, domain.name)
        if paused is None:
            paused = record.paused if record is not None else False
        decisions = decide_domain(domain, config, networks, kernel, record)
        kept = {}
        if record is not None:
            # Keep records of NICs whose port still exists: a NIC that left
            # the XML without a teardown is for status/teardown to handle.
            kept = {r.mac: r for r in record.nics if not prune or _still_there(kernel, r)}
        # Bad input (an error decision) stops the run before any change,
        # unless the admin chose on_error = continue.
        hold = config.on_error == "fail" and any(d.action == "error" for d in decisions)
        bridges = {}  # bridge ifindex -> (vlan_filtering, default_pvid)
        if not hold and not dry_run:
            for d in decisions:
                if d.managed and d.bridge_ifindex not in bridges:
                    ensure_bridge_policy(kernel, store, config, d.bridge, d.bridge_ifindex, d.network)
        results = []
        done = []  # (index in results, decision, state before, entry before, old record)
        for d in decisions:
            if d.action == "skip":
                results.append(NicResult(d, "skipped", d.reason))
                continue
            if d.action == "error":
                results.append(NicResult(d, "failed", d.reason))
                continue
            if hold:
                results.append(NicResult(d, "held", "not applied: another NIC of the domain failed"))
                continue
            old = kept.get(d.nic.mac)
            result, rec, before = _apply_nic(kernel, config, d, old, dry_run, bridges, paused)
            results.append(result)
            if rec is not None:
                kept[rec.mac] = rec
                done.append((len(results) - 1, d, before, old))
        if config.on_error == "fail" and not dry_run and any(r.failed for r in results):
            # All or nothing: put back every port this run changed.
            for i, d, (before, target), old in done:
                if results[i].ops:
                    _rollback(kernel, d, before, target)
                    results[i] = NicResult(d, "rolled back", "undone: another NIC of the domain failed")
                if old is None:
                    kept.pop(d.nic.mac, None)
                else:
                    kept[d.nic.mac] = old
        new_record = DomainRecord(driver=domain.driver, domain=domain.name, uuid=domain.uuid,
                                  nics=tuple(sorted(kept.values(), key=lambda r: r.mac)), paused=paused)
        if not dry_run:
            store.save(new_record)
    for result in results:
        if not dry_run:
            _log_line(domain.driver, domain.name, result)
    return Report(domain.driver, domain.name, tuple(results), new_record)


def teardown_domain(driver, name, kernel, store, dry_run=False, macs=None):
    """Undo what the record of ``driver/name`` says we applied.

    Ports that are gone took their entries with them; ports that are not ours
    any more (re-created, moved) are left alone. ``macs`` limits teardown to
    some NICs (device detach).
    """
    from fdbhook.model import Nic

    with store.lock():
        record = store.load(driver, name)
        if record is None:
            return Report(driver, name, ())
        results = []
        left = []
        for rec in record.nics:
            if macs is not None and rec.mac not in macs:
                left.append(rec)
                continue
            d = Decision(nic=Nic(index=0, type="?", mac=rec.mac, alias=rec.alias or rec.port), action="manage", reason="recorded",
                         port=rec.port, ifindex=rec.ifindex, bridge=rec.bridge, network=rec.network)
            link = kernel.by_index(rec.ifindex)
            bridge_link = kernel.by_index(link.master) if link is not None and link.master else None
            vids = tuple(v or None for v in rec.vids) or (None,)
            entries = ({vid: kernel.fdb_get(rec.mac, bridge_link.ifindex, vid) for vid in vids}
                       if bridge_link is not None else {})
            ops = planner.plan_teardown(rec, link, bridge_link, entries)
            if link is None or link.name != rec.port:
                results.append(NicResult(d, "gone", "port gone, nothing to undo"))
                continue
            if dry_run:
                results.append(NicResult(d, "planned", planner.describe(ops), ops))
                continue
            try:
                for op in ops:
                    kernel.execute(op)
            except KernelError as exc:
                if _still_there(kernel, rec):
                    results.append(NicResult(d, "failed", str(exc), ops))
                    left.append(rec)
                else:
                    results.append(NicResult(d, "gone", "port vanished during teardown"))
                continue
            results.append(NicResult(d, "removed", planner.describe(ops), ops))
        if not dry_run:
            store.save(replace(record, nics=tuple(left)))
            release_bridges(kernel, store)
    for result in results:
        if not dry_run:
            _log_line(driver, name, result)
    return Report(driver, name, tuple(results), replace(record, nics=tuple(left)))


def _decision_from_record(kernel, rec, cache=None):
    """A 'manage' Decision rebuilt from a record, or None if the port is not ours any more."""
    from fdbhook.model import Nic

    link = kernel.by_index(rec.ifindex)
    if link is None or link.name != rec.port or not link.is_bridge_port:
        return None
    cache = {} if cache is None else cache
    key = ("link", link.master)
    if key not in cache:
        cache[key] = kernel.by_index(link.master)
    bridge = cache[key]
    if bridge is None or bridge.name != rec.bridge:
        return None
    vlan, trunk = None, ()
    if rec.set_vlans:
        vlan = next((vid for vid, pvid, _ in rec.set_vlans if pvid), None)
        trunk = tuple(vid for vid, pvid, _ in rec.set_vlans if not pvid)
    nic = Nic(index=0, type="recorded", mac=rec.mac, alias=rec.alias or rec.port, vlan=vlan, trunk=trunk)
    return Decision(nic=nic, action="manage", reason="recorded", port=rec.port, ifindex=rec.ifindex,
                    bridge=rec.bridge, bridge_ifindex=bridge.ifindex, network=rec.network, link=link)


def reapply_record(driver, name, kernel, store, config, paused=None, bridges=None):
    """Bring a domain's recorded ports back to their recorded state, from the record alone.

    The daemon's drift repair and pause/resume handling: no XML, no libvirt.
    NICs whose port is gone are dropped from the record. ``paused`` True/False
    also changes the record's state (entries out/in). ``bridges`` caches
    bridge facts across calls (a full resync). Returns the Report.
    """
    with store.lock():
        record = store.load(driver, name)
        if record is None:
            return Report(driver, name, ())
        if paused is None:
            paused = record.paused
        results, kept = [], []
        bridges = {} if bridges is None else bridges
        for rec in record.nics:
            d = _decision_from_record(kernel, rec, bridges)
            if d is None:
                from fdbhook.model import Nic
                gone = Decision(nic=Nic(index=0, type="recorded", mac=rec.mac, alias=rec.alias or rec.port),
                                action="manage", reason="recorded", port=rec.port, bridge=rec.bridge)
                results.append(NicResult(gone, "gone", "port gone, record dropped"))
                continue
            result, new, _ = _apply_nic(kernel, config, d, rec, False, bridges, paused)
            results.append(result)
            kept.append(new if new is not None else rec)
        new_record = replace(record, nics=tuple(kept), paused=paused)
        if new_record != record:  # an unchanged record is not rewritten (resync of 1000 ports)
            store.save(new_record)
    for result in results:
        if result.status != "unchanged":
            _log_line(driver, name, result)
    return Report(driver, name, tuple(results), new_record)


def resync(kernel, store, config):
    """Compare every managed port with its record and the kernel; repair drift.

    Returns (ports checked, repairs made, failures).
    """
    checked = repaired = failed = 0
    bridges = {}
    for record in store.all():
        report = reapply_record(record.driver, record.domain, kernel, store, config, bridges=bridges)
        for result in report.results:
            checked += 1
            repaired += result.status in ("changed", "gone")
            failed += result.failed
    release_bridges_locked(kernel, store)
    return checked, repaired, failed


def release_bridges_locked(kernel, store):
    with store.lock():
        release_bridges(kernel, store)
