"""The only module that talks netlink (through pyroute2).

Everything the rest of fdbhook knows about the kernel passes through
``Kernel``: link lookups by name or index, single FDB lookups, VLAN
membership, and ``execute`` for every kind of plan.Op; ``LinkMonitor`` for
the daemon's link events. Every request costs O(1) netlink messages per NIC;
nothing here dumps a whole bridge except ``links`` (status, explain).
"""

import errno
import logging
import struct
import sys

from fdbhook.errors import KernelError
from fdbhook.model import FdbEntry, Link

LOG = logging.getLogger(__name__)

# --- netlink constants, and why -------------------------------------------
# NUD_NOARP alone makes the bridge store a STATIC entry: it never ages and
# forwards to the port. NUD_PERMANENT would make it LOCAL (frames go to the
# host, not the guest) - which is what pyroute2's fdb('add') defaults to, so
# every call here passes the state explicitly.
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
# NTF_MASTER: the entry lives in the bridge's FDB (not the port driver's own,
# NTF_SELF, pyroute2's other default). NTF_STICKY: a frame with this source
# MAC arriving on another port (a forger, the uplink) cannot move the entry.
NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_STICKY = 0x40
AF_BRIDGE = 7
# NDA_FLAGS_EXT bit: a "locked" entry the bridge made for a source MAC that a
# locked port with MAB (kernel >= 6.2) dropped; it never forwards.
NTF_EXT_LOCKED = 0x02
# struct bridge_vlan_info flags (linux/if_bridge.h)
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4


def _teach_pyroute2():
    """Add the bridge port flags ``locked`` (5.18) and ``mab`` (6.2) and NDA_FLAGS_EXT to pyroute2's maps.

    Debian 12's pyroute2 0.7.2 stops at IFLA_BRPORT_MRP_IN_OPEN (36) and
    NDA_MASTER (9); the kernel's numbering is fixed ABI (linux/if_link.h,
    linux/neighbour.h), so appending the missing names in order is exact.
    Must run before pyroute2 compiles the maps (the first message parsed).
    """
    from pyroute2.netlink.rtnl.ifinfmsg import protinfo_bridge
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    names = [n[0] for n in protinfo_bridge.nla_map]
    if "IFLA_BRPORT_LOCKED" not in names and names[-1] == "IFLA_BRPORT_MRP_IN_OPEN":
        protinfo_bridge.nla_map = tuple(protinfo_bridge.nla_map) + (
            ("IFLA_BRPORT_MCAST_EHT_HOSTS_LIMIT", "uint32"), ("IFLA_BRPORT_MCAST_EHT_HOSTS_CNT", "uint32"),
            ("IFLA_BRPORT_LOCKED", "uint8"), ("IFLA_BRPORT_MAB", "uint8"))
    names = [n[0] for n in ndmsg.nla_map]
    if "NDA_FLAGS_EXT" not in names and names[-1] == "NDA_MASTER":
        ndmsg.nla_map = tuple(ndmsg.nla_map) + (
            ("NDA_LINK_NETNSID", "uint32"), ("NDA_SRC_VNI", "uint32"), ("NDA_PROTOCOL", "uint8"),
            ("NDA_NH_ID", "uint32"), ("NDA_FDB_EXT_ATTRS", "hex"), ("NDA_FLAGS_EXT", "uint32"))


def _nl_errno(exc):
    code = getattr(exc, "code", None)
    if code is None and exc.args and isinstance(exc.args[0], int):
        code = exc.args[0]
    return code


def link_from_msg(msg):
    """Build a Link from an RTM_NEWLINK message (pyroute2 object)."""
    get = msg.get_attr
    info = get("IFLA_LINKINFO")
    kind = slave_kind = slave = None
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
        slave_kind = info.get_attr("IFLA_INFO_SLAVE_KIND")
        slave = info.get_attr("IFLA_INFO_SLAVE_DATA")
    peer = get("IFLA_LINK")
    # A veth whose peer lives in another namespace reports the peer's index
    # in *that* namespace; it means nothing here.
    if get("IFLA_LINK_NETNSID") is not None or peer == msg["index"]:
        peer = None
    learning = flood = locked = mab = None
    is_port = slave_kind == "bridge"
    if is_port and slave is not None:
        learning = slave.get_attr("IFLA_BRPORT_LEARNING")
        flood = slave.get_attr("IFLA_BRPORT_UNICAST_FLOOD")
        learning = None if learning is None else bool(learning)
        flood = None if flood is None else bool(flood)
        locked = slave.get_attr("IFLA_BRPORT_LOCKED")
        mab = slave.get_attr("IFLA_BRPORT_MAB")
        locked = None if locked is None else bool(locked)
        mab = None if mab is None else bool(mab)
    return Link(
        name=get("IFLA_IFNAME"),
        ifindex=msg["index"],
        kind=kind,
        master=get("IFLA_MASTER") or None,
        peer=peer or None,
        mac=get("IFLA_ADDRESS"),
        promiscuity=get("IFLA_PROMISCUITY") or 0,
        is_bridge_port=is_port,
        learning=learning,
        flood=flood,
        locked=locked,
        mab=mab,
    )


def entry_from_msg(msg):
    state = msg["state"]
    flags = msg["flags"]
    vlan = msg.get_attr("NDA_VLAN")
    return FdbEntry(
        mac=msg.get_attr("NDA_LLADDR"),
        ifindex=msg["ifindex"],
        static=bool(state & NUD_NOARP) and not state & NUD_PERMANENT,
        local=bool(state & NUD_PERMANENT),
        sticky=bool(flags & NTF_STICKY),
        vlan=vlan or 0,
        locked=bool((msg.get_attr("NDA_FLAGS_EXT") or 0) & NTF_EXT_LOCKED),
    )


class Kernel:
    """Netlink access for one run. Not thread-safe; open one per thread."""

    def __init__(self):
        self._ipr = None
        self.sticky_supported = True

    @property
    def ipr(self):
        if self._ipr is None:
            _raw_netlink_sockets()
            _teach_pyroute2()
            # Imported here so that code paths that never touch the kernel
            # (dry-run on a file, the daemon client) do not pay for pyroute2.
            try:
                from pyroute2 import IPRoute
                self._ipr = IPRoute()
            except OSError as exc:
                raise KernelError(what="netlink socket", reason=exc.strerror or str(exc)) from None
        return self._ipr

    def close(self):
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- reads -----------------------------------------------------------
    def _get_link(self, **key):
        try:
            msgs = self.ipr.link("get", **key)
        except Exception as exc:  # pyroute2 raises NetlinkError(OSError subclass)
            if _nl_errno(exc) in (errno.ENODEV, errno.ENOENT):
                return None
            raise KernelError(what="link get %s" % key, reason=str(exc)) from None
        return link_from_msg(msgs[0]) if msgs else None

    def by_name(self, name):
        if not name or len(name) > 15 or "/" in name:
            return None
        return self._get_link(ifname=name)

    def by_index(self, ifindex):
        if not ifindex:
            return None
        return self._get_link(index=ifindex)

    def fdb_get(self, mac, bridge_ifindex, vlan=0):
        """The bridge's entry for ``mac`` on ``vlan`` (0 = no VLAN), or None."""
        kw = dict(ifindex=0, lladdr=mac, master=bridge_ifindex)
        if vlan:
            kw["vlan"] = vlan
        try:
            msgs = self.ipr.fdb("get", **kw)
        except Exception as exc:
            if _nl_errno(exc) in (errno.ENOENT, errno.ENODEV):
                return None
            raise KernelError(what="fdb get %s" % mac, reason=str(exc)) from None
        for msg in msgs:
            if not msg["flags"] & NTF_SELF:
                return entry_from_msg(msg)
        return None

    # --- status helpers (O(bridge), never used by the hook path) ----------
    def links(self):
        return [link_from_msg(m) for m in self.ipr.get_links()]

    def locked_entries(self, port_ifindex):
        """MACs the bridge saw as sources on a locked MAB port and dropped: [(mac, vid)]. One dump."""
        try:
            msgs = self.ipr.fdb("dump", ifindex=port_ifindex)
        except Exception as exc:
            raise KernelError(what="bridge fdb show dev %d" % port_ifindex, reason=_reason(exc)) from None
        out = []
        for msg in msgs:
            if msg["ifindex"] != port_ifindex or msg["flags"] & NTF_SELF:
                continue
            entry = entry_from_msg(msg)
            if entry.locked:
                out.append((entry.mac, entry.vlan))
        return sorted(out)

    def bridge_vlan_filtering(self, ifindex):
        """Is VLAN filtering on for this bridge?"""
        try:
            msgs = self.ipr.link("get", index=ifindex)
        except Exception as exc:
            raise KernelError(what="link get %d" % ifindex, reason=_reason(exc)) from None
        info = msgs[0].get_attr("IFLA_LINKINFO")
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        return bool(data is not None and data.get_attr("IFLA_BR_VLAN_FILTERING"))

    def port_vlans(self, ifindex):
        """A port's VLAN membership: ((vid, pvid, untagged), ...).

        The kernel answers AF_BRIDGE link requests only as dumps; this costs
        one dump of the bridge ports, and runs only on VLAN-filtering bridges.
        """
        try:
            msgs = self.ipr.get_vlans()
        except Exception as exc:
            raise KernelError(what="bridge vlan show", reason=_reason(exc)) from None
        out = []
        for msg in msgs:
            if msg["index"] != ifindex:
                continue
            spec = msg.get_attr("IFLA_AF_SPEC")
            if spec is None:
                continue
            for name, value in spec["attrs"]:
                if name == "IFLA_BRIDGE_VLAN_INFO":
                    flags = value["flags"]
                    out.append((value["vid"], bool(flags & BRIDGE_VLAN_INFO_PVID),
                                bool(flags & BRIDGE_VLAN_INFO_UNTAGGED)))
        return tuple(sorted(out))

    def set_vlan_filtering(self, bridge_ifindex, enabled):
        """Turn a bridge's VLAN filtering on or off (EOPNOTSUPP -> KernelError)."""
        try:
            self.ipr.link("set", index=bridge_ifindex, kind="bridge", br_vlan_filtering=int(enabled))
        except Exception as exc:
            raise KernelError(what="ip link set dev %d type bridge vlan_filtering %d" % (
                bridge_ifindex, int(enabled)), reason=_reason(exc), errno=_nl_errno(exc)) from None

    # --- writes ----------------------------------------------------------
    def execute(self, op):
        """Carry out one plan.Op. Raises KernelError naming the op."""
        try:
            if op.kind == "fdb_replace":
                self._fdb_replace(op)
            elif op.kind == "fdb_del":
                self._fdb_del(op)
            elif op.kind == "set_flags":
                kw = {}
                if op.learning is not None:
                    kw["learning"] = int(op.learning)
                if op.flood is not None:
                    kw["unicast_flood"] = int(op.flood)
                if op.locked is not None:
                    kw["locked"] = int(op.locked)
                if op.mab is not None:
                    kw["mab"] = int(op.mab)
                self.ipr.brport("set", index=op.ifindex, **kw)
            elif op.kind in ("vlan_add", "vlan_del"):
                flags = (BRIDGE_VLAN_INFO_PVID if op.pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if op.untagged else 0)
                try:
                    self.ipr.vlan_filter("add" if op.kind == "vlan_add" else "del", index=op.ifindex,
                                         vlan_info={"vid": op.vlan, "flags": flags})
                except Exception as exc:
                    if op.kind == "vlan_add" or _nl_errno(exc) not in (errno.ENOENT, errno.ENODEV):
                        raise
            elif op.kind == "flush":
                # IFLA_BRPORT_FLUSH drops the port's learned entries and keeps
                # static and local ones (br_fdb_delete_by_port, do_all=0).
                self.ipr.brport("set", index=op.ifindex, flush=True)
            else:
                raise ValueError("unknown op %r" % op.kind)
        except KernelError:
            raise
        except Exception as exc:
            from fdbhook.plan import render
            raise KernelError(what=render(op), reason=_reason(exc)) from None

    def _fdb_replace(self, op):
        flags = NTF_MASTER
        if op.sticky and self.sticky_supported:
            flags |= NTF_STICKY
        kw = dict(ifindex=op.ifindex, lladdr=op.mac, state=NUD_NOARP, flags=flags)
        if op.vlan:
            kw["vlan"] = op.vlan
        try:
            self.ipr.fdb("replace", **kw)
        except Exception as exc:
            if flags & NTF_STICKY and _nl_errno(exc) == errno.EINVAL:
                # Kernels before 4.20 have no sticky entries: keep static.
                LOG.warning("kernel refuses sticky FDB entries; using plain static ones")
                self.sticky_supported = False
                kw["flags"] = NTF_MASTER
                self.ipr.fdb("replace", **kw)
            else:
                raise

    def _fdb_del(self, op):
        kw = dict(ifindex=op.ifindex, lladdr=op.mac, state=NUD_NOARP, flags=NTF_MASTER)
        if op.vlan:
            kw["vlan"] = op.vlan
        try:
            self.ipr.fdb("del", **kw)
        except Exception as exc:
            if _nl_errno(exc) not in (errno.ENOENT, errno.ENODEV):
                raise


def _raw_netlink_sockets():
    """Make pyroute2 open SOCK_RAW netlink sockets instead of SOCK_DGRAM.

    Debian/Ubuntu's libvirtd AppArmor profile (which hooks run under) allows
    ``network netlink raw`` only; for netlink the kernel treats both types the
    same, so this changes nothing else.
    """
    import socket

    from pyroute2 import config as nlconfig

    if getattr(nlconfig.SocketBase, "_fdbhook_raw", False):
        return

    class RawNetlinkSocket(nlconfig.SocketBase):
        _fdbhook_raw = True

        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if family == socket.AF_NETLINK and fileno is None:
                type = socket.SOCK_RAW
            super().__init__(family, type, proto, fileno)

    nlconfig.SocketBase = RawNetlinkSocket


class LinkMonitor:
    """Kernel link events, parsed just enough: (event, ifindex, name, master).

    A raw NETLINK_ROUTE socket in the RTMGRP_LINK group, decoded by hand:
    every change fdbhook itself makes to a port produces an event, and
    decoding each with pyroute2 would cost the daemon (and the hooks it serves
    at that moment) a fraction of a millisecond apiece.
    """

    RTMGRP_LINK = 0x1
    _IFLA_IFNAME = 3
    _IFLA_MASTER = 10
    _HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
    _IFI = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
    _RTA = struct.Struct("=HH")

    def __init__(self):
        import socket

        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._sock.bind((0, self.RTMGRP_LINK))
        self._sock.setblocking(False)

    def fileno(self):
        return self._sock.fileno()

    def read(self):
        """Pending events: a list of (event 'new'|'del', ifindex, name, master ifindex or 0)."""
        out = []
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # we fell behind; callers resync anyway
                    continue
                raise
            out.extend(self.parse(data))

    @classmethod
    def parse(cls, data):
        out = []
        pos = 0
        while pos + cls._HDR.size <= len(data):
            length, mtype, _, _, _ = cls._HDR.unpack_from(data, pos)
            if length < cls._HDR.size:
                break
            if mtype in (16, 17):  # RTM_NEWLINK, RTM_DELLINK
                family, _, index, _, _ = cls._IFI.unpack_from(data, pos + cls._HDR.size)
                if family != AF_BRIDGE:
                    name, master = None, 0
                    apos = pos + cls._HDR.size + cls._IFI.size
                    end = pos + length
                    while apos + 4 <= end:
                        alen, atype = cls._RTA.unpack_from(data, apos)
                        if alen < 4:
                            break
                        value = data[apos + 4:apos + alen]
                        if atype == cls._IFLA_IFNAME:
                            name = value.split(b"\0", 1)[0].decode(errors="replace")
                        elif atype == cls._IFLA_MASTER and len(value) >= 4:
                            master = int.from_bytes(value[:4], sys.byteorder)
                        apos += (alen + 3) & ~3
                    out.append(("new" if mtype == 16 else "del", index, name, master))
            pos += (length + 3) & ~3
        return out

    def close(self):
        self._sock.close()


def _reason(exc):
    code = _nl_errno(exc)
    if isinstance(code, int) and code > 0:
        import os
        return "%s (errno %d)" % (os.strerror(code), code)
    return str(exc) or exc.__class__.__name__
