"""Where is each NIC? Port device, bridge and libvirt network, without libvirt.

``place_nic`` is pure: the kernel is seen through a ``links`` view with
``by_name(name)`` and ``by_index(ifindex)`` (kernel.py provides the live one,
tests a dict), and libvirt networks through a mapping name -> Network that
``load_networks`` fills from libvirt's state and config files.
"""

import os
from dataclasses import dataclass
from typing import Optional

from fdbhook import domxml
from fdbhook.errors import InvalidDomainXML
from fdbhook.model import BRIDGED_TYPES, SKIP_REASONS, Link, Nic


@dataclass(frozen=True)
class Placement:
    nic: Nic
    skip: Optional[str] = None  # this NIC type is never ours
    problem: Optional[str] = None  # inconsistent or missing information
    port: Optional[str] = None
    ifindex: Optional[int] = None
    port_link: Optional[Link] = None
    xml_bridge: Optional[str] = None
    kernel_bridge: Optional[str] = None
    bridge_link: Optional[Link] = None
    network: Optional[str] = None
    mac_table_manager: Optional[str] = None

    @property
    def bridge(self):
        """The kernel's master wins; the XML's bridge is a fallback."""
        return self.kernel_bridge or self.xml_bridge


class DictLinks:
    """A links view over a list of Link objects (tests, snapshots)."""

    def __init__(self, links=()):
        self._by_name = {link.name: link for link in links}
        self._by_index = {link.ifindex: link for link in links}

    def by_name(self, name):
        return self._by_name.get(name)

    def by_index(self, ifindex):
        return self._by_index.get(ifindex)


def load_networks(names, dirs):
    """Read libvirt network XML for ``names`` from ``dirs`` (first hit wins).

    /run/libvirt/network/NAME.xml is the running network's status,
    /etc/libvirt/qemu/networks/NAME.xml its persistent definition; both name
    the bridge. Unreadable or broken files are passed over.
    """
    found = {}
    for name in set(n for n in names if n):
        if "/" in name or name.startswith("."):
            continue
        for directory in dirs:
            path = os.path.join(directory, name + ".xml")
            try:
                with open(path, "rb") as handle:
                    net = domxml.parse_network(handle.read(), what=name)
            except (OSError, InvalidDomainXML):
                continue
            if net.name == name:
                found[name] = net
                break
    return found


def _host_port(domain, nic, links, record):
    """Name of the host-side port, and the Link if the kernel has it."""
    if domain.driver == "lxc" and nic.guest_actual:
        # libvirt names the container end of the veth; its peer is the port.
        inner = links.by_name(nic.guest_actual)
        if inner is not None and inner.peer:
            peer = links.by_index(inner.peer)
            if peer is not None:
                return peer.name, peer
    if nic.target_dev:
        return nic.target_dev, links.by_name(nic.target_dev)
    # The XML no longer names the port (LXC after the veth moved into the
    # container): trust our own record if the kernel still agrees with it.
    rec = record.nic(nic.mac) if record is not None and nic.mac else None
    if rec is not None:
        link = links.by_index(rec.ifindex)
        if link is not None and link.name == rec.port:
            return rec.port, link
    return None, None


def place_nic(domain, nic, networks, links, record=None):
    """Find port, bridges and network of one NIC. Never raises on odd input."""
    if nic.type not in BRIDGED_TYPES:
        reason = SKIP_REASONS.get(nic.type, "type %r has no bridge port" % (nic.type or "missing"))
        return Placement(nic=nic, skip=reason)
    network = nic.source_network if nic.type == "network" else None
    mtm = nic.source_mtm
    xml_bridge = None
    problem = None
    if nic.type == "bridge":
        xml_bridge = nic.source_bridge
        if not xml_bridge:
            problem = "type='bridge' without <source bridge=...>"
    elif nic.type == "network":
        if not network:
            problem = "type='network' without <source network=...>"
        net = networks.get(network) if network else None
        if net is not None:
            mtm = mtm or net.mac_table_manager
        xml_bridge = nic.source_bridge or (net.bridge if net is not None else None)
        if network and not xml_bridge and problem is None:
            problem = "libvirt network %r: bridge unknown (no live XML, no network state file)" % network

    port, port_link = _host_port(domain, nic, links, record)
    kernel_bridge = bridge_link = None
    if port_link is not None and port_link.master:
        bridge_link = links.by_index(port_link.master)
        kernel_bridge = bridge_link.name if bridge_link is not None else None
    if kernel_bridge and xml_bridge and kernel_bridge != xml_bridge:
        problem = "port %s is on bridge %s but the XML says %s" % (port, kernel_bridge, xml_bridge)
    return Placement(
        nic=nic,
        problem=problem,
        port=port,
        ifindex=port_link.ifindex if port_link is not None else None,
        port_link=port_link,
        xml_bridge=xml_bridge,
        kernel_bridge=kernel_bridge,
        bridge_link=bridge_link,
        network=network,
        mac_table_manager=mtm,
    )
