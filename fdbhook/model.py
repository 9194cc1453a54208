"""Pure state objects. Nothing here touches the kernel, libvirt or files."""

import re
from dataclasses import dataclass, field
from typing import FrozenSet, Optional, Tuple

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def normalize_mac(text):
    """Return the MAC in lower-case colon form, or None if it is not one."""
    if text is None:
        return None
    mac = text.strip().lower().replace("-", ":")
    if _MAC_RE.match(mac):
        return mac
    return None


def mac_problem(mac):
    """Why this MAC cannot get a static unicast entry, or None if it can."""
    if mac is None:
        return "no MAC address"
    if mac == "00:00:00:00:00:00":
        return "MAC %s is all-zero" % mac
    if int(mac[:2], 16) & 1:
        return "MAC %s is multicast/broadcast" % mac
    return None

def libvirt_tap_mac(mac):
    """The MAC libvirt gives the host side of a tap it creates for a NIC with ``mac``: the NIC's with the first
    byte 0xfe, or 0xfa for a NIC MAC that starts with 0xfe."""
    if not mac:
        return None
    return ("fa" if mac[:2] == "fe" else "fe") + mac[2:]


QEMU_PREFIX = "52:54:00"  # the prefix libvirt's qemu driver generates every NIC MAC under (QEMU's OUI)
LIBVIRT_PREFIX = "vnet"  # libvirt's reserved prefix for the taps and host veths it names itself


def tap_made_by_libvirt(link, macs):
    """For a port ``link``: True if it is a tap libvirt made for one of ``macs``; False if it is the tap of a
    MAC libvirt generated (address fe:54:00:..) that is none of them: another NIC's; None otherwise. Only
    that prefix says "another NIC's": a tap the kernel addressed at random (an admin's, made beforehand)
    starts fe: one time in 64, fe:54:00: one time in four million."""
    if link is None or link.kind != "tun" or not link.mac:
        return None
    if link.mac in {libvirt_tap_mac(m) for m in macs if m}:
        return True
    return False if link.mac.startswith(libvirt_tap_mac(QEMU_PREFIX) + ":") else None


# Our metadata namespace inside <domain><metadata>.
FDB_NS = "urn:x-fdbhook:1"

# NIC types that put a host-side port on a Linux bridge.
BRIDGED_TYPES = ("bridge", "network", "ethernet")

SKIP_REASONS = {
    "user": "type 'user' is userspace networking (slirp/passt), no host port",
    "direct": "type 'direct' is macvtap on a host NIC, not a bridge port",
    "hostdev": "type 'hostdev' passes a PCI/VF device through, no bridge port",
    "vhostuser": "type 'vhostuser' is a vhost-user socket, no kernel bridge port",
    "vdpa": "type 'vdpa' is a vDPA device, no kernel bridge port",
    "server": "type 'server' is a QEMU socket backend, no host port",
    "client": "type 'client' is a QEMU socket backend, no host port",
    "mcast": "type 'mcast' is a QEMU socket backend, no host port",
    "udp": "type 'udp' is a QEMU socket backend, no host port",
    "internal": "type 'internal' has no host port",
    "null": "type 'null' has no host port",
    "vds": "type 'vds' is not a Linux bridge",
}


@dataclass(frozen=True)
class Nic:
    """One <interface> as the XML states it."""

    index: int
    type: str
    mac: Optional[str] = None  # the MAC in effect: the guest's current one where libvirt reports it
    config_mac: Optional[str] = None  # <mac address>, when the guest changed it (libvirt >= 11.2 currentAddress)
    source_bridge: Optional[str] = None
    source_network: Optional[str] = None
    source_mtm: Optional[str] = None  # macTableManager on a live network NIC
    target_dev: Optional[str] = None
    guest_dev: Optional[str] = None  # LXC: container-side name (eth0)
    guest_actual: Optional[str] = None  # LXC: container end of the veth
    alias: Optional[str] = None
    mode: str = "on"  # from our metadata: on | off
    vlan: Optional[int] = None
    trunk: Tuple[int, ...] = ()
    extra_macs: Tuple[str, ...] = ()  # further MACs the guest sends from on this NIC (static entries too)
    locked: Optional[bool] = None  # lock mode from metadata; None: the config decides
    floating_macs: Tuple[str, ...] = ()  # MACs that move between guests (VRRP): left to learning

    @property
    def label(self):
        """Short name for messages: alias or position, plus the MAC."""
        name = self.alias or "#%d" % self.index
        return "%s (%s)" % (name, self.mac or "no MAC")


@dataclass(frozen=True)
class Domain:
    name: str
    driver: str  # qemu | lxc
    uuid: Optional[str] = None
    nics: Tuple[Nic, ...] = ()
    mode: str = "on"  # domain-wide opt-out from our metadata


@dataclass(frozen=True)
class Network:
    """What fdbhook needs from a libvirt network definition or status."""

    name: str
    bridge: Optional[str] = None
    mac_table_manager: Optional[str] = None  # kernel | libvirt | None
    forward_mode: Optional[str] = None


@dataclass(frozen=True)
class Link:
    """A kernel link, as read by kernel.py."""

    name: str
    ifindex: int
    kind: Optional[str] = None  # bridge, veth, tun, ...
    master: Optional[int] = None  # ifindex of the master device
    peer: Optional[int] = None  # IFLA_LINK: a veth's peer ifindex
    mac: Optional[str] = None
    promiscuity: int = 0
    is_bridge_port: bool = False
    learning: Optional[bool] = None
    flood: Optional[bool] = None
    locked: Optional[bool] = None  # None: the kernel does not report the flag (before 5.18)
    mab: Optional[bool] = None  # None: the kernel does not report the flag (before 6.2)


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    ifindex: int
    static: bool  # NUD_NOARP without PERMANENT: a forwarding entry
    local: bool  # NUD_PERMANENT: frames go to the host
    sticky: bool = False
    vlan: int = 0
    locked: bool = False  # NTF_EXT_LOCKED: a MAB entry, a source MAC a locked port dropped
    extern_learn: bool = False  # NTF_EXT_LEARNED: put there by a control plane (FRR's zebra: a remote EVPN MAC)
    on_vxlan: bool = False  # it points at a VXLAN port of the same bridge (filled in by current.read_port)

    @property
    def dynamic(self):
        """Learned by the bridge itself (an extern_learn entry is somebody's, not the kernel's guess)."""
        return not (self.static or self.local or self.extern_learn)


@dataclass(frozen=True)
class Decision:
    """What fdbhook does with one NIC, and why."""

    nic: Nic
    action: str  # manage | skip | error
    reason: str
    port: Optional[str] = None
    ifindex: Optional[int] = None
    bridge: Optional[str] = None
    bridge_ifindex: Optional[int] = None
    network: Optional[str] = None
    # The port as resolution read it, so apply need not read it again.
    link: Optional[Link] = field(default=None, compare=False, repr=False)

    @property
    def managed(self):
        return self.action == "manage"


@dataclass(frozen=True)
class Op:
    """One kernel change: fdb_replace | fdb_del | set_flags | flush | vlan_add | vlan_del | bridge_set.

    ``bridge_set`` changes the bridge itself (``ifindex`` and ``port`` name the
    bridge): ``vlan_filtering`` on or off.
    """

    kind: str
    port: str
    ifindex: int
    mac: Optional[str] = None
    bridge: Optional[str] = None
    bridge_ifindex: Optional[int] = None
    learning: Optional[bool] = None
    flood: Optional[bool] = None
    locked: Optional[bool] = None
    mab: Optional[bool] = None
    sticky: bool = False
    vlan: int = 0  # 0: no VLAN (VID 0, the only one on a bridge without VLAN filtering)
    pvid: bool = False
    untagged: bool = False
    vlan_filtering: Optional[bool] = None


# One static FDB entry fdbhook wants or watches: (MAC, VID), VID 0 = no VLAN.
EntryKey = Tuple[str, int]

# A port's VLAN membership: ((vid, pvid, untagged), ...) sorted by vid.
Membership = Tuple[Tuple[int, bool, bool], ...]


@dataclass(frozen=True)
class DesiredPort:
    """What one port should look like. Built from a NIC's decision or from a record.

    ``entries`` are the static entries wanted on the port; ``watch`` are
    further (MAC, VID) pairs that may carry an entry of ours that must go (the
    guest's old MAC after a change, every entry while the guest is paused,
    everything at teardown). ``membership`` None leaves VLAN membership alone;
    ``locked`` / ``mab`` None leave those port flags alone (lock mode off).
    """

    port: str
    ifindex: int
    bridge: str
    bridge_ifindex: int
    entries: FrozenSet[EntryKey] = frozenset()
    watch: FrozenSet[EntryKey] = frozenset()
    sticky: bool = True
    learning: bool = False
    flood: bool = False
    membership: Optional[Membership] = None
    locked: Optional[bool] = None
    mab: Optional[bool] = None

    @property
    def keys(self):
        """Every (MAC, VID) whose entry the plan needs to see, sorted."""
        return tuple(sorted(self.entries | self.watch))


@dataclass(frozen=True)
class CurrentPort:
    """What the kernel has for one port, as fdbhook.current.read_port read it.

    ``exists`` is False when the port is gone, renamed, re-created (another
    ifindex) or on another bridge: then it is not ours to touch.
    """

    port: str
    ifindex: int
    exists: bool
    learning: bool = False
    flood: bool = False
    locked: Optional[bool] = None  # None: the kernel has no locked ports
    mab: Optional[bool] = None  # None: the kernel has no MAB
    entries: Tuple[Tuple[EntryKey, Optional[FdbEntry]], ...] = ()
    membership: Optional[Membership] = None  # read only when the desired state sets it

    def entry(self, key):
        for have_key, entry in self.entries:
            if have_key == key:
                return entry
        return None

    def owns(self, key):
        """Is there a static entry for ``key`` pointing at this port?"""
        entry = self.entry(key)
        return entry is not None and entry.ifindex == self.ifindex and entry.static


@dataclass(frozen=True)
class NicRecord:
    """What was applied to one NIC: enough to undo it after the XML forgot."""

    mac: str
    port: str
    ifindex: int
    bridge: str
    network: Optional[str] = None
    prev_learning: bool = True
    prev_flood: bool = True
    sticky: bool = False
    applied: float = 0.0
    alias: Optional[str] = None
    vids: Tuple[int, ...] = ()  # VLANs with our entry; () = VID 0 (no VLAN filtering)
    prev_vlans: Optional[Membership] = None  # membership before we set it, if we did
    set_vlans: Optional[Membership] = None  # membership we set
    config_mac: Optional[str] = None  # the configured MAC when the guest uses another (``mac``)
    extra_macs: Tuple[str, ...] = ()  # further MACs with a static entry on the port, like ``mac``
    locked: bool = False  # lock mode: we locked the port
    prev_locked: bool = False  # the port's locked flag before us (teardown restores it)
    mab: bool = False  # we turned MAB (and so learning) on
    floating_macs: Tuple[str, ...] = ()  # left to learning on this port, never static

    def __post_init__(self):
        # Records come back from JSON with lists; they compare equal only as tuples.
        for name in ("extra_macs", "floating_macs"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value or ()))

    @property
    def macs(self):
        """The primary MAC, then the extra ones: every MAC with a static entry."""
        return (self.mac,) + tuple(m for m in self.extra_macs if m != self.mac)

    @property
    def keys(self):
        """(MAC, VID) of every entry this record stands for; VID 0 = no VLAN."""
        return frozenset((mac, vid) for mac in self.macs for vid in (self.vids or (0,)))


@dataclass(frozen=True)
class DomainRecord:
    driver: str
    domain: str
    uuid: Optional[str] = None
    nics: Tuple[NicRecord, ...] = field(default_factory=tuple)
    paused: bool = False  # guest CPUs stopped: ports stay locked down, entries removed

    def nic(self, mac):
        for rec in self.nics:
            if rec.mac == mac:
                return rec
        return None
