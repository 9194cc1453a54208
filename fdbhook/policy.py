"""Is a NIC ours to manage? Pure: placement + config -> Decision with a reason."""

from fdbhook import domxml
from fdbhook.model import LIBVIRT_PREFIX, Decision, tap_made_by_libvirt
from fdbhook.resolve import place_nic


def decide(domain, placement, config):
    """Turn a Placement into manage/skip/error, always with a reason.

    Skips come first (opt-outs, NIC types, unmanaged bridges) so that a broken
    NIC on a bridge we do not manage is never an error of ours.
    """
    nic = placement.nic
    base = dict(nic=nic, port=placement.port, ifindex=placement.ifindex,
                bridge=placement.bridge, network=placement.network,
                bridge_ifindex=placement.bridge_link.ifindex if placement.bridge_link else None)

    def skip(reason):
        return Decision(action="skip", reason=reason, **base)

    def error(reason):
        return Decision(action="error", reason=reason, **base)

    if domain.mode == "off":
        return skip("domain opted out (fdb:fdb mode='off')")
    if nic.mode == "off":
        return skip("NIC opted out (fdb:interface mode='off')")
    if placement.skip:
        return skip(placement.skip)
    if placement.mac_table_manager == "libvirt":
        return skip("network %s: libvirt manages this MAC table itself (macTableManager='libvirt')"
                    % (placement.network or placement.bridge))

    why = _managed_because(placement, config)
    if why is None:
        if not config.exists:
            return skip("no config (%s): nothing is managed" % config.path)
        if placement.network:
            return skip("network %s / bridge %s not in [manage]" % (placement.network, placement.bridge or "?"))
        if placement.bridge:
            return skip("bridge %s not in [manage] bridges" % placement.bridge)
        if nic.type == "ethernet":
            return skip("type 'ethernet' port %s is on no bridge" % (placement.port or "(unnamed)"))
        return skip("no bridge known")

    problem = domxml.mac_problem(domxml.normalize_mac(nic.mac)) if nic.mac else "no MAC address"
    if nic.mac and domxml.normalize_mac(nic.mac) is None:
        problem = "MAC %r is not a MAC address" % nic.mac
    if problem:
        return error(problem + ", refused")
    if placement.problem:
        return error(placement.problem)
    if not placement.port:
        return error("no host-side port in the XML (%s)" % _port_hint(domain, nic))
    if placement.port_link is None:
        return error("port %s does not exist" % placement.port)
    if placement.bridge_link is None:
        return error("port %s is not on any bridge (expected %s)" % (placement.port, placement.xml_bridge))
    if placement.bridge_link.kind not in (None, "bridge"):
        return skip("port %s is on %s, a %s device, not a Linux bridge"
                    % (placement.port, placement.kernel_bridge, placement.bridge_link.kind))
    return Decision(action="manage", reason=why, link=placement.port_link, **base)


def _managed_because(placement, config):
    """The config match that makes this NIC's network or bridge managed, in words; None if none does."""
    if placement.network and config.network_managed(placement.network):
        return "network %s matches %r" % (placement.network, config.network_managed(placement.network))
    for bridge in (placement.kernel_bridge, placement.xml_bridge):
        if bridge and config.bridge_managed(bridge):
            return "bridge %s matches %r" % (bridge, config.bridge_managed(bridge))
    return None


def _port_hint(domain, nic):
    if domain.driver == "lxc":
        return "guest actual=%r not found or has no veth peer" % nic.guest_actual
    return "no <target dev>; libvirt sets it from the start hook on"


def decide_domain(domain, config, networks, links, record=None):
    """Decisions for every NIC of the domain, in XML order."""
    return tuple(decide(domain, place_nic(domain, nic, networks, links, record), config)
                 for nic in domain.nics)


# --- port ownership ------------------------------------------------------------------
#
# A domain's XML is written by whoever may define that domain; its <target dev>
# and MACs are claims, not facts. A port is managed only if it is the guest's
# own (README "Security model"):
#   * a tap ("tun") or veth, never the bridge itself or another kind of device
#     (an ethernet NIC, a bond, a macvlan: uplinks);
#   * never a port named in [manage] uplinks, never one another domain's record holds;
#   * a tap libvirt made for this NIC (its MAC is the NIC's with the first
#     byte 0xfe, or 0xfa for a NIC MAC that starts with 0xfe: libvirt's
#     virNetDevTapCreateInBridgePort and the ethernet-type set-up) is taken
#     at once (no FDB dump: it costs no round trip);
#   * a tap named vnetN (libvirt's own name) addressed fe:54:00:.. for
#     another MAC is the tap of a NIC MAC libvirt generated, another NIC's:
#     refused, entries or not (a hot-plugged guest's tap locked down at its
#     join may carry none yet);
#   * any other port (LXC's host-side veth gets a random MAC; a pre-created
#     tap with managed='no') only if it carries no static or local FDB entry
#     but its own address and this NIC's MACs (checked when the domain first
#     takes it, not again while its record holds it);
#   * no MAC of the NIC may be the bridge's or the port's own address (a
#     local entry: fdbhook never replaces or deletes one);
#   * at most [manage] max_extra_macs extra MACs per NIC.

OWN_KINDS = ("tun", "veth")


def port_problem(d, config, extra_macs, port_link, bridge_link, port_entries, holder, own_macs=()):
    """Why ``d`` (a managed Decision) must not take its port, or None. Pure.

    ``holder``: the domain whose record holds this port ("qemu/other"), or
    None; ``port_entries``: the port's bridge FDB entries (FdbEntry);
    ``own_macs``: MACs this domain's record already has on the port.
    """
    port = d.port
    if port_link is None:
        return None  # decide() already said "does not exist"
    if (bridge_link is not None and port_link.ifindex == bridge_link.ifindex) or port_link.kind == "bridge":
        return "port %s is the bridge itself, not a guest's port: refused" % port
    if config.uplink(port):
        return "port %s is an uplink ([manage] uplinks = %s), not a guest's port: refused" % (
            port, config.uplink(port))
    if port_link.kind not in OWN_KINDS:
        return "port %s is a %s device, not a tap or veth: an uplink, not a guest's port: refused" % (
            port, port_link.kind or "physical (ethernet)")
    if len(extra_macs) > config.max_extra_macs:
        return "%d extra MACs, more than [manage] max_extra_macs = %d: refused" % (
            len(extra_macs), config.max_extra_macs)
    macs = (d.nic.mac,) + tuple(extra_macs)
    for mac in macs:
        if bridge_link is not None and bridge_link.mac and mac == bridge_link.mac:
            return "MAC %s is bridge %s's own address (a local FDB entry, never replaced): refused" % (
                mac, bridge_link.name)
        if port_link.mac and mac == port_link.mac:
            return "MAC %s is port %s's own address (a local FDB entry, never replaced): refused" % (mac, port)
    if holder is not None:
        return "port %s belongs to domain %s (its record), not this guest: refused" % (port, holder)
    made = tap_made_by_libvirt(port_link, (d.nic.mac, d.nic.config_mac))
    if made:
        return None  # libvirt created this tap for this very NIC
    if made is False and port.startswith(LIBVIRT_PREFIX):
        return ("port %s is the tap libvirt made for another NIC (its address %s is not from this NIC's MAC): "
                "refused" % (port, port_link.mac))
    allowed = set(macs) | set(own_macs) | {port_link.mac}
    if d.nic.config_mac:
        allowed.add(d.nic.config_mac)
    foreign = sorted({e.mac for e in port_entries
                      if (e.static or e.local) and not e.locked and e.mac not in allowed})
    if foreign:
        return "port %s carries FDB entries that are not this NIC's (%s): not a guest's port: refused" % (
            port, ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else ""))
    return None


def refuse_foreign_ports(domain, decisions, config, records, kernel, extra_macs_of):
    """Managed decisions whose port is not the guest's own, turned into errors (see port_problem).

    ``records``: every domain record (this domain's own is recognised);
    ``kernel``: reads links and a port's entries; ``extra_macs_of(d)``: the
    NIC's extra MACs (metadata and config sections merged).
    """
    holders, mine = {}, {}
    for record in records:
        ours = (record.driver, record.domain) == (domain.driver, domain.name)
        for rec in record.nics:
            if ours:
                mine.setdefault((rec.port, rec.ifindex), set()).update(rec.macs)
            else:
                holders.setdefault((rec.port, rec.ifindex), "%s/%s" % (record.driver, record.domain))
    out = []
    for d in decisions:
        if d.managed:
            port_link = d.link if d.link is not None else kernel.by_index(d.ifindex)
            bridge_link = kernel.by_index(d.bridge_ifindex) if d.bridge_ifindex else None
            key = (d.port, d.ifindex)
            taken = tap_made_by_libvirt(port_link, (d.nic.mac, d.nic.config_mac)) is True
            entries = kernel.port_entries(d.ifindex) if port_link is not None and not taken and key not in mine else ()
            problem = port_problem(d, config, extra_macs_of(d), port_link, bridge_link, entries,
                                   holders.get(key), mine.get(key, ()))
            if problem:
                d = Decision(action="error", reason=problem, nic=d.nic, port=d.port, ifindex=d.ifindex,
                             bridge=d.bridge, bridge_ifindex=d.bridge_ifindex, network=d.network)
        out.append(d)
    return tuple(out)
