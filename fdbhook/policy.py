"""Is a NIC ours to manage? Pure: placement + config -> Decision with a reason."""

from fdbhook import domxml
from fdbhook.model import Decision
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
