"""Whose NIC is a port that just joined a bridge? Decided from what the port itself tells.

Pure: no kernel, no libvirt. fdbhookd's link monitor asks this on every port
that joins a bridge and that no record knows, with the NICs it already knows
(hook XML, live XML from libvirt), so the NIC's plan can go in within
milliseconds of the join instead of after libvirt's DEVICE_ADDED or the
start hook.

How libvirt names and addresses what it puts on a bridge (libvirt's source):

* qemu (``virNetDevTapCreateInBridgePort``): a tap (kind ``tun``) named
  ``vnetN`` unless ``<target dev>`` says otherwise, whose MAC is the NIC's
  MAC with the first byte set to 0xfe, set before the tap joins the bridge.
  libvirt refuses a NIC MAC whose first byte is 0xfe, so no guest's own MAC
  ever looks like a tap's.
* lxc (``virLXCProcessSetupInterfaceTap``): a veth pair; the host end (the
  port, ``vnetN``) keeps the MAC the kernel chose at random, nothing predicts
  it; the container end, the port's peer (IFLA_LINK), gets the NIC's MAC and
  is still in the host's namespace when the host end joins.

A port matches only a NIC of the right driver whose MAC it carries that way,
on the bridge the NIC names (when the XML names one), with the name the XML
gives or else one of libvirt's own (``vnetN``), and only when exactly one
known NIC matches: anything else
(an uplink, an admin's port, two NICs that differ only in the first byte, a
NIC whose XML names another device) is not decided here and stays untouched.
"""

from dataclasses import dataclass, replace
from typing import Optional

from fdbhook.model import Domain, Nic

TAP_BYTE = "fe"
LIBVIRT_PREFIX = "vnet"  # libvirt's reserved prefix for the taps and host veths it names itself


def tap_mac(nic_mac):
    """The MAC libvirt gives the host tap of a qemu NIC with ``nic_mac`` (lower-case colon form)."""
    return TAP_BYTE + nic_mac[2:]


@dataclass(frozen=True)
class JoinedPort:
    """What the kernel says about a port that joined a bridge."""

    name: str
    kind: Optional[str]  # tun, veth, ...
    mac: Optional[str]
    bridge: str
    peer_mac: Optional[str] = None  # veth: the MAC of its peer


def libvirt_style(port):
    """Could libvirt have made this port for a NIC (a tap addressed from a NIC MAC, a veth)?"""
    return (port.kind == "tun" and bool(port.mac) and port.mac.startswith(TAP_BYTE + ":")) or port.kind == "veth"


@dataclass(frozen=True)
class Match:
    """The known NIC the port belongs to: ``domain`` with only that NIC, its target dev the port."""

    domain: Domain
    nic: Nic


def _nic_macs(nic):
    # The tap is addressed from <mac address> (config_mac when the guest changed its MAC).
    return {m for m in (nic.config_mac, nic.mac) if m}


def _fits(port, domain, nic):
    if domain.driver == "qemu":
        if port.kind != "tun" or not port.mac or not port.mac.startswith(TAP_BYTE + ":"):
            return False
        if not any(tap_mac(m) == port.mac for m in _nic_macs(nic)):
            return False
    elif domain.driver == "lxc":
        if port.kind != "veth" or not port.peer_mac or port.peer_mac not in _nic_macs(nic):
            return False
    else:
        return False
    if nic.type not in ("bridge", "network"):
        return False
    if nic.source_bridge and nic.source_bridge != port.bridge:
        return False
    if nic.target_dev:  # the XML names the device (libvirt made it so, or will create that one)
        return nic.target_dev == port.name
    return port.name.startswith(LIBVIRT_PREFIX)  # otherwise libvirt names it itself


def match_joined(port, domains):
    """The Match for ``port`` among ``domains`` (Domain objects fdbhookd knows), or None.

    None unless exactly one NIC of one domain fits: a port nothing vouches
    for is never taken.
    """
    found = [(domain, nic) for domain in domains for nic in domain.nics if _fits(port, domain, nic)]
    if len(found) != 1:
        return None
    domain, nic = found[0]
    nic = replace(nic, target_dev=port.name)
    return Match(domain=replace(domain, nics=(nic,)), nic=nic)
