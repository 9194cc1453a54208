"""Pure state objects. Nothing here touches the kernel, libvirt or files."""

from dataclasses import dataclass, field
from typing import Optional, Tuple

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
    mac: Optional[str] = None
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


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    ifindex: int
    static: bool  # NUD_NOARP without PERMANENT: a forwarding entry
    local: bool  # NUD_PERMANENT: frames go to the host
    sticky: bool = False
    vlan: Optional[int] = None

    @property
    def dynamic(self):
        return not (self.static or self.local)


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
class PortState:
    """The part of a port's state that fdbhook may change."""

    learning: bool
    flood: bool


@dataclass(frozen=True)
class Op:
    """One kernel change. ``kind`` is fdb_replace | fdb_del | set_flags | flush."""

    kind: str
    port: str
    ifindex: int
    mac: Optional[str] = None
    bridge: Optional[str] = None
    bridge_ifindex: Optional[int] = None
    learning: Optional[bool] = None
    flood: Optional[bool] = None
    sticky: bool = False
    vlan: Optional[int] = None
    pvid: bool = False
    untagged: bool = False


# A port's VLAN membership: ((vid, pvid, untagged), ...) sorted by vid.
Membership = Tuple[Tuple[int, bool, bool], ...]


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
