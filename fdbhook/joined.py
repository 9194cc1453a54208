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

import re
from dataclasses import dataclass, replace
from typing import Optional

from fdbhook.model import LIBVIRT_PREFIX, QEMU_PREFIX, Domain, Nic, libvirt_tap_mac, mac_problem

TAP_BYTE = "fe"


@dataclass(frozen=True)
class JoinedPort:
    """What the kernel says about a port that joined a bridge."""

    name: str
    kind: Optional[str]  # tun, veth, ...
    mac: Optional[str]
    bridge: str
    peer_mac: Optional[str] = None  # veth: the MAC of its peer (only when the peer points back: host namespace)
    peer_kind: Optional[str] = None  # veth: its peer's kind (a veth, when libvirt made the pair)


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
        if not any(libvirt_tap_mac(m) == port.mac for m in _nic_macs(nic)):
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


# --- lock-down at the join: a port that is unmistakably a guest's, whose NIC nobody knows yet ----------
#
# A hot-plugged NIC's MAC is known to nothing before libvirt lists the NIC
# (tens of ms after the tap joined, more under load), and meanwhile its port
# learns and floods. What the port itself tells is enough to know it is a
# guest's, never whose: so it gets learning and unicast flood off, and the
# one entry the port predicts (``predicted_mac``), until the NIC becomes known
# (the normal apply takes it over) or a bound passes (it is put back as it
# was). fdbhook.lockdown does the writes.

VNET = re.compile(r"^%s[0-9]+$" % LIBVIRT_PREFIX)


@dataclass(frozen=True)
class Lockdown:
    """The decision for one joined port: ``lock`` it or not, and why (for the log and ``status``)."""

    lock: bool
    why: str


def guest_port(port, target_devs=frozenset()):
    """Why ``port`` is unmistakably a port libvirt made for a guest NIC, or None.

    qemu: a tap (kind tun) whose MAC has the first byte 0xfe (libvirt's tap
    address; libvirt refuses 0xfe as a NIC's first byte), named like
    libvirt's own taps (``vnetN``, a prefix libvirt reserves) or as the
    ``<target dev>`` of a NIC fdbhookd knows. lxc: a veth named ``vnetN``
    whose peer is a veth still in the host's namespace (the container end
    before libvirt moves it). Nothing else: an uplink veth, an admin's tap,
    a tun without the tap address.
    """
    if port.kind == "tun":
        if not port.mac or not port.mac.startswith(TAP_BYTE + ":"):
            return None
        if VNET.match(port.name):
            return "qemu tap %s (tap address %s, libvirt's name)" % (port.name, port.mac)
        if port.name in target_devs:
            return "qemu tap %s (tap address %s, a known NIC's target dev)" % (port.name, port.mac)
        return None
    if port.kind == "veth" and VNET.match(port.name) and port.peer_kind == "veth" and port.peer_mac:
        return "lxc host veth %s (libvirt's name, its peer a veth in the host namespace)" % port.name
    return None




def predicted_mac(port):
    """The NIC's MAC as far as ``port`` (a guest port being locked down) tells it, or None. Pure.

    lxc: the peer (the container end) carries the NIC's MAC itself. qemu:
    the tap carries all of it but the first byte; a tap ``fe:54:00:..`` is
    taken for ``52:54:00:..``, the prefix libvirt generates every qemu NIC MAC
    under. An admin's MAC ``02:54:00:..`` is predicted wrong: the apply of
    the NIC, once libvirt names it, puts its own entry in and takes the
    predicted one out (the pending record names it), as at the bound.
    """
    if port.kind == "tun" and port.mac and port.mac.startswith(TAP_BYTE + QEMU_PREFIX[2:] + ":"):
        return QEMU_PREFIX[:2] + port.mac[2:]
    if port.kind == "veth" and port.peer_kind == "veth" and mac_problem(port.peer_mac) is None:
        return port.peer_mac
    return None


def decide_lockdown(port, uplink=None, recorded=None, foreign_entries=(), target_devs=frozenset(), known=False):
    """Lock ``port`` down now? Pure.

    ``uplink``: the ``[manage] uplinks`` glob naming it; ``recorded``: the
    domain whose record holds it; ``foreign_entries``: MACs of static entries
    on it that are nobody's plan (an admin's); ``known``: a known NIC matches
    it (then the NIC's own plan applies at once, not a lock-down).
    """
    if known:
        return Lockdown(False, "a known NIC matches: its plan applies")
    if uplink:
        return Lockdown(False, "listed in [manage] uplinks (%s)" % uplink)
    if recorded:
        return Lockdown(False, "recorded as a port of %s" % recorded)
    if foreign_entries:
        return Lockdown(False, "carries static entries that are not ours (%s)" % ", ".join(sorted(foreign_entries)))
    why = guest_port(port, target_devs)
    if why is None:
        return Lockdown(False, "not unmistakably a guest's port")
    return Lockdown(True, why)
