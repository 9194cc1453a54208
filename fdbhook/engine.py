"""Apply and tear down: plan, execute, verify, roll back, record.

The hooks, the CLI and (later) the daemon all come through here. One call
handles one domain under the store's lock; every managed NIC is its own
transaction: if any step for a port fails, that port is put back exactly as
it was and the failure is reported, naming domain, NIC and reason.
"""

import logging
import time
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from fdbhook import plan as planner
from fdbhook.errors import ApplyError, KernelError
from fdbhook.model import Decision, DomainRecord, NicRecord, Op, PortState
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


def _verify(kernel, d, sticky):
    link = kernel.by_index(d.ifindex)
    if link is None or link.name != d.port:
        raise ApplyError(domain="?", nic=d.nic.label, reason="port %s vanished while being set up" % d.port)
    problems = []
    if link.learning:
        problems.append("learning still on")
    if link.flood:
        problems.append("flood still on")
    entry = kernel.fdb_get(d.nic.mac, d.bridge_ifindex)
    if entry is None or entry.ifindex != d.ifindex or not entry.static:
        problems.append("static FDB entry missing")
    elif sticky and not entry.sticky:
        problems.append("FDB entry not sticky")
    if problems:
        raise ApplyError(domain="?", nic=d.nic.label, reason="verify failed: " + ", ".join(problems))


def _rollback(kernel, d, before, before_entry):
    try:
        now_entry = kernel.fdb_get(d.nic.mac, d.bridge_ifindex)
    except KernelError:
        now_entry = None
    for op in planner.plan_restore(d, before, before_entry, now_entry):
        try:
            kernel.execute(op)
        except KernelError as exc:
            LOG.error("rollback of %s failed: %s", d.port, exc)


def _apply_nic(kernel, config, d, prev_rec, dry_run):
    """Bring one managed port to its desired state.

    Returns (result, new record or None, (state, entry) before the change).
    """
    mac = d.nic.mac
    link = kernel.by_index(d.ifindex)
    if link is None or not link.is_bridge_port:
        return NicResult(d, "failed", "port %s vanished" % d.port), None, None
    before = PortState(learning=bool(link.learning), flood=bool(link.flood))
    entry = kernel.fdb_get(mac, d.bridge_ifindex)
    same_port = prev_rec is not None and prev_rec.ifindex == d.ifindex and prev_rec.port == d.port
    owned = same_port and entry is not None and entry.ifindex == prev_rec.ifindex
    conflict = planner.entry_conflict(d.port, d.ifindex, mac, entry, owned)
    if conflict:
        return NicResult(d, "failed", conflict), None, None
    sticky = config.sticky and kernel.sticky_supported
    ops = planner.plan_apply(d, before, entry, sticky, first_time=not same_port)
    if dry_run:
        return NicResult(d, "planned", planner.describe(ops), ops), None, None
    try:
        for op in ops:
            kernel.execute(op)
        sticky = sticky and kernel.sticky_supported
        _verify(kernel, d, sticky)
    except (KernelError, ApplyError) as exc:
        _rollback(kernel, d, before, entry)
        reason = exc.kwargs.get("reason") if isinstance(exc, ApplyError) else str(exc)
        return NicResult(d, "failed", "%s; port restored" % reason, ops), None, None
    if same_port:
        rec = replace(prev_rec, bridge=d.bridge, network=d.network, sticky=sticky)
    else:
        rec = NicRecord(mac=mac, port=d.port, ifindex=d.ifindex, bridge=d.bridge, network=d.network,
                        prev_learning=before.learning, prev_flood=before.flood, sticky=sticky,
                        applied=round(time.time(), 3), alias=d.nic.alias)
    return NicResult(d, "changed" if ops else "unchanged", planner.describe(ops), ops), rec, (before, entry)


def _still_there(kernel, rec):
    link = kernel.by_index(rec.ifindex)
    return link is not None and link.name == rec.port


def apply_domain(domain, config, kernel, store, dry_run=False):
    """Manage every NIC of ``domain`` that policy says is ours.

    Idempotent: a second run sends nothing when the kernel already matches.
    Returns a Report; never raises for a single NIC's failure.
    """
    networks = load_networks([n.source_network for n in domain.nics if n.type == "network"],
                             config.network_dirs)
    with store.lock():
        record = store.load(domain.driver, domain.name)
        decisions = decide_domain(domain, config, networks, kernel, record)
        kept = {}
        if record is not None:
            # Keep records of NICs whose port still exists: a NIC that left
            # the XML without a teardown is for status/teardown to handle.
            kept = {r.mac: r for r in record.nics if _still_there(kernel, r)}
        # Bad input (an error decision) stops the run before any change,
        # unless the admin chose on_error = continue.
        hold = config.on_error == "fail" and any(d.action == "error" for d in decisions)
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
            result, rec, before = _apply_nic(kernel, config, d, old, dry_run)
            results.append(result)
            if rec is not None:
                kept[rec.mac] = rec
                done.append((len(results) - 1, d, before, old))
        if config.on_error == "fail" and not dry_run and any(r.failed for r in results):
            # All or nothing: put back every port this run changed.
            for i, d, (state, entry), old in done:
                if results[i].ops:
                    _rollback(kernel, d, state, entry)
                    results[i] = NicResult(d, "rolled back", "undone: another NIC of the domain failed")
                if old is None:
                    kept.pop(d.nic.mac, None)
                else:
                    kept[d.nic.mac] = old
        new_record = DomainRecord(driver=domain.driver, domain=domain.name, uuid=domain.uuid,
                                  nics=tuple(sorted(kept.values(), key=lambda r: r.mac)))
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
            entry = kernel.fdb_get(rec.mac, bridge_link.ifindex) if bridge_link is not None else None
            ops = planner.plan_teardown(rec, link, bridge_link, entry)
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
    for result in results:
        if not dry_run:
            _log_line(driver, name, result)
    return Report(driver, name, tuple(results), replace(record, nics=tuple(left)))
