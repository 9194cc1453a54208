"""Current port state: the one place that reads what the kernel has for a port.

Everything that compares (apply, verify, rollback, teardown, drift repair,
``status``) reads through ``read_port`` and hands the result to
``plan.plan_port``, so they cannot disagree about what "right" means.
``kernel`` is fdbhook.kernel.Kernel or a fake with the same methods.
"""

from dataclasses import replace

from fdbhook.model import CurrentPort


def read_port(kernel, want, link=None, membership=None):
    """CurrentPort for the port of ``want`` (a DesiredPort), reading the entries of ``want.keys``.

    ``link`` is the port's Link if the caller has just read it. VLAN
    membership is read only when ``want`` sets it (or ``membership`` True).
    The port counts as existing only with the same name and ifindex, still
    enslaved to ``want.bridge_ifindex``.
    """
    # One round trip for the link, every entry and the VLANs (what was read already is not asked again).
    fdb = [(mac, want.bridge_ifindex, vid) for mac, vid in sorted(want.keys)]
    read_vlans = want.membership is not None if membership is None else membership
    vlans = [want.ifindex] if read_vlans else []
    if link is None or link.ifindex != want.ifindex:
        kernel.prefetch(indexes=[want.ifindex], fdb=fdb, vlans=vlans)
        link = kernel.by_index(want.ifindex)
    else:
        kernel.prefetch(fdb=fdb, vlans=vlans)
    exists = (link is not None and link.name == want.port and link.is_bridge_port
              and link.master == want.bridge_ifindex)
    if not exists:
        return CurrentPort(port=want.port, ifindex=want.ifindex, exists=False)
    entries = tuple((key, _mark_vxlan(kernel, kernel.fdb_get(key[0], want.bridge_ifindex, key[1]), want))
                    for key in want.keys)
    return CurrentPort(port=want.port, ifindex=want.ifindex, exists=True, learning=bool(link.learning),
                       flood=bool(link.flood), locked=link.locked, mab=link.mab, entries=entries,
                       membership=kernel.port_vlans(want.ifindex) if read_vlans else None)


def _mark_vxlan(kernel, entry, want):
    """An extern_learn entry on another port: is that port a VXLAN device of our bridge (a remote EVPN MAC)?"""
    if entry is None or not entry.extern_learn or entry.ifindex == want.ifindex:
        return entry
    port = kernel.by_index(entry.ifindex)
    if port is not None and port.kind == "vxlan" and port.master == want.bridge_ifindex:
        return replace(entry, on_vxlan=True)
    return entry


def locate(kernel, rec, bridges=None):
    """(port Link, bridge Link) of a record's port if it is still ours, else None.

    Ours: same name and ifindex, a bridge port whose master is still the
    recorded bridge. ``bridges`` caches bridge lookups across records.
    """
    link = kernel.by_index(rec.ifindex)
    if link is None or link.name != rec.port or not link.is_bridge_port or not link.master:
        return None
    bridges = {} if bridges is None else bridges
    if link.master not in bridges:
        bridges[link.master] = kernel.by_index(link.master)
    bridge = bridges[link.master]
    if bridge is None or bridge.name != rec.bridge:
        return None
    return link, bridge
