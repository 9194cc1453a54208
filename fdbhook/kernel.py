"""The only module that talks netlink (through pyroute2).

Everything the rest of fdbhook knows about the kernel passes through
``Kernel``: link lookups by name or index, single FDB lookups, VLAN
membership, and ``execute`` for every kind of plan.Op; ``LinkMonitor`` for
the daemon's link events. Every request costs O(1) netlink messages per NIC;
nothing here dumps a whole bridge except ``links`` (status, explain). VLAN
membership is one port's filtered RTM_GETVLAN dump (Linux >= 5.8), not the
whole namespace's.
"""

import errno
import logging
import os
import struct
import sys

from fdbhook import faults
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
# NUD_REACHABLE with NUD_NOARP: still STATIC to the bridge, but a different state
# than the one it reports, so a replace counts as a change and is notified (announce).
NUD_REACHABLE = 0x02
# NTF_MASTER: the entry lives in the bridge's FDB (not the port driver's own,
# NTF_SELF, pyroute2's other default). NTF_STICKY: a frame with this source
# MAC arriving on another port (a forger, the uplink) cannot move the entry.
NTF_SELF = 0x02
# netlink header: every batched request asks for an acknowledgement, an
# NLMSG_ERROR whose code is 0 on success, so each answer has a clear end.
NLM_F_ACK = 0x04
NLMSG_ERROR = 0x02
NLMSG_DONE = 0x03
SO_RCVBUFFORCE = 33
RCVBUF = 4 << 20  # bytes
RECV = 256 << 10  # bytes of one receive (the kernel's netlink skbs stay under 64 KiB)
BATCH = 256  # requests in one round trip (256 link answers: about 1 MiB of buffer)
NTF_MASTER = 0x04
NTF_STICKY = 0x40
# NTF_EXT_LEARNED: an entry a control plane added (FRR's zebra puts remote
# EVPN MACs on the VXLAN port this way); the bridge never ages or moves it.
NTF_EXT_LEARNED = 0x10
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
    pyroute2 compiles a class's map once, when it first builds a message of
    it, and keeps the result on the class for the whole process: a map
    changed after that (anything in the process parsed a link or neighbour
    message first, e.g. a test reading with pyroute2 itself) is compiled
    again here, or the new names would never be decoded.
    """
    from pyroute2.netlink.rtnl.ifinfmsg import protinfo_bridge
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    names = [n[0] for n in protinfo_bridge.nla_map]
    if "IFLA_BRPORT_LOCKED" not in names and names[-1] == "IFLA_BRPORT_MRP_IN_OPEN":
        protinfo_bridge.nla_map = tuple(protinfo_bridge.nla_map) + (
            ("IFLA_BRPORT_MCAST_EHT_HOSTS_LIMIT", "uint32"), ("IFLA_BRPORT_MCAST_EHT_HOSTS_CNT", "uint32"),
            ("IFLA_BRPORT_LOCKED", "uint8"), ("IFLA_BRPORT_MAB", "uint8"))
        _recompile(protinfo_bridge)
    names = [n[0] for n in ndmsg.nla_map]
    if "NDA_FLAGS_EXT" not in names and names[-1] == "NDA_MASTER":
        ndmsg.nla_map = tuple(ndmsg.nla_map) + (
            ("NDA_LINK_NETNSID", "uint32"), ("NDA_SRC_VNI", "uint32"), ("NDA_PROTOCOL", "uint8"),
            ("NDA_NH_ID", "uint32"), ("NDA_FDB_EXT_ATTRS", "hex"), ("NDA_FLAGS_EXT", "uint32"))
        _recompile(ndmsg)


def _recompile(cls):
    """Make ``cls`` and its subclasses (ifinfmsg's bridge_slave_data is one) compile their maps again.

    pyroute2 (0.7.x) marks a compiled class with ``nlmsg_base.__compiled_nla``
    in the class's own dict; clearing it recompiles from the new ``nla_map``
    when the next message of that class is built.
    """
    flag = "_nlmsg_base__compiled_nla"
    todo = [cls]
    while todo:
        klass = todo.pop()
        todo.extend(klass.__subclasses__())
        if vars(klass).get(flag):
            setattr(klass, flag, False)


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
        extern_learn=bool(flags & NTF_EXT_LEARNED),
    )


class Kernel:
    """Netlink access for one run. Not thread-safe; open one per thread."""

    def __init__(self):
        self._ipr = None
        self._encoder = None
        self._seq = 0x10000000
        self._sock = None
        self._buf = bytearray(RECV)  # one receive buffer, reused (no 1 MiB allocation a read)
        self._view = memoryview(self._buf)
        # Capabilities, probed once (never inferred from one request's error: an
        # EINVAL also means "VLAN not on this port").
        caps = self.capabilities()
        self.sticky_supported = caps["sticky"]
        # One operation's reads (prefetch, by_name, by_index, fdb_get,
        # bridge_vlan_filtering), answered from here until the next write or
        # forget(): the engine forgets at the start of every operation.
        self._seen = {}
        # Bridge name -> ifindex, kept across operations: only a guess that
        # lets the first batch ask for FDB entries too; every reply checks it.
        self._bridges = {}
        self._vlan_capable = {}
        # The kernel refused RTM_GETVLAN (EOPNOTSUPP): port_vlans dumps the old way.
        self._old_vlan_dump = False

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

    def _netlink(self):
        """The batched path's own rtnetlink socket: plain SOCK_RAW (AppArmor's libvirtd profile allows
        it), no pyroute2, so a hook that needs nothing else never imports it."""
        if self._sock is None:
            import socket
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)  # NETLINK_ROUTE
                # A batch's answers arrive at once (a link message takes about
                # 4 KiB of buffer): past the default 208 KiB the kernel drops
                # them (ENOBUFS). Root may raise the limit, others get rmem_max.
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                sock.bind((0, 0))
            except OSError as exc:
                raise KernelError(what="netlink socket", reason=exc.strerror or str(exc)) from None
            self._sock = sock
        return self._sock

    def close(self):
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def capabilities(release=None):
        """{feature: bool} of what this kernel's bridge can do, from its version (uapi history).

        sticky FDB entries 4.20, locked ports 5.18, MAB 6.2. VLAN filtering is
        a build option: ``vlan_filtering_capable`` asks per bridge.
        """
        version = kernel_version(release if release is not None else os.uname().release)
        return {"sticky": version >= (4, 20), "locked": version >= (5, 18), "mab": version >= (6, 2)}

    def vlan_filtering_capable(self, bridge_ifindex):
        """Can this bridge filter VLANs? The kernel reports IFLA_BR_VLAN_PROTOCOL only when built with it."""
        self.bridge_vlan_filtering(bridge_ifindex)
        return bool(self._vlan_capable.get(bridge_ifindex, True))

    # --- reads -----------------------------------------------------------
    def forget(self):
        """Drop the reads of the last operation: what follows asks the kernel again."""
        self._seen.clear()

    def _remember_link(self, raw):
        """Keep a link read in a batch (its message's bytes)."""
        link, filtering = link_from_raw(raw)
        self._seen[("index", link.ifindex)] = link
        self._seen[("name", link.name)] = link
        if link.kind == "bridge":
            self._seen[("filtering", link.ifindex)] = filtering
            self._bridges[link.name] = link.ifindex
            self._vlan_capable[link.ifindex] = _vlan_protocol_present(raw)
        return link

    def _one(self, key, **wanted):
        """One read (a key of ``_seen``): from what this operation has read, else asked now; KernelError if it fails."""
        if key not in self._seen:
            self._fetch(wanted, strict=True)
        return self._seen.get(key)

    def by_name(self, name):
        if not name or len(name) > 15 or "/" in name:
            return None
        return self._one(("name", name), names=[name])

    def by_index(self, ifindex):
        if not ifindex:
            return None
        return self._one(("index", ifindex), indexes=[ifindex])

    def fdb_get(self, mac, bridge_ifindex, vlan=0):
        """The bridge's entry for ``mac`` on ``vlan`` (0 = no VLAN), or None."""
        return self._one(("fdb", mac, bridge_ifindex, vlan or 0), fdb=[(mac, bridge_ifindex, vlan)])

    def bridge_vlan_filtering(self, ifindex):
        """Is VLAN filtering on for this bridge?"""
        return bool(self._one(("filtering", ifindex), indexes=[ifindex]))

    def bridge_for(self, name):
        """The ifindex this bridge had when we last saw it (a guess to check), or None."""
        return self._bridges.get(name)

    def prefetch(self, names=(), indexes=(), fdb=(), vxlan=(), vlans=()):
        """Read links (by name, by ifindex), FDB entries ((mac, bridge_ifindex, vid)), bridges' VXLAN ports
        and ports' VLAN membership (by ifindex) in one round trip.

        Every request goes out in one send and the answers are collected
        together; later reads of the same things are answered from them until
        the next write or ``forget``. Things already read are not asked again.
        A failure here is not an error: the read that needs it asks again and
        reports it.
        """
        self._fetch(dict(names=names, indexes=indexes, fdb=fdb, vxlan=vxlan, vlans=vlans), strict=False)

    def _fetch(self, wanted, strict):
        requests = []
        for name in dict.fromkeys(wanted.get("names", ())):
            if name and len(name) <= 15 and "/" not in name and ("name", name) not in self._seen:
                requests.append((("name", name), msg_link_get(name=name)))
        for ifindex in dict.fromkeys(wanted.get("indexes", ())):
            if ifindex and ("index", ifindex) not in self._seen:
                requests.append((("index", ifindex), msg_link_get(ifindex=ifindex)))
        for mac, bridge_ifindex, vlan in dict.fromkeys(wanted.get("fdb", ())):
            key = ("fdb", mac, bridge_ifindex, vlan or 0)
            if bridge_ifindex and key not in self._seen:
                requests.append((key, msg_fdb_get(mac, bridge_ifindex, vlan)))
        for bridge_ifindex in dict.fromkeys(wanted.get("vxlan", ())):
            if bridge_ifindex and ("vxlan", bridge_ifindex) not in self._seen:
                if not vxlan_driver_loaded():
                    # No driver, no VXLAN device. And the kernel filters a link
                    # dump by kind only when it knows the kind: without the
                    # module it sends every port of the bridge (1,000 links).
                    self._seen[("vxlan", bridge_ifindex)] = ()
                    continue
                requests.append((("vxlan", bridge_ifindex), msg_vxlan_ports(bridge_ifindex)))
        for ifindex in dict.fromkeys(wanted.get("vlans", ())):
            if ifindex and ("vlans", ifindex) not in self._seen and not self._old_vlan_dump:
                requests.append((("vlans", ifindex), msg_vlan_dump(ifindex)))
        if not requests:
            return
        try:
            answers = self._round_trip([raw for _, raw in requests])
        except Exception as exc:
            if strict:
                raise KernelError(what="netlink read %s" % (requests[0][0],), reason=_reason(exc)) from None
            LOG.debug("prefetch failed, the reads will ask again: %s", exc)
            return
        for (key, _), (msgs, code) in zip(requests, answers):
            gone = code in (errno.ENODEV, errno.ENOENT)
            if code and not gone:
                if key[0] == "vlans" and code == errno.EINVAL:
                    self._seen[key] = ()  # not a bridge port (or a bridge): no VLANs of its own
                    continue
                if key[0] == "vlans" and code == errno.EOPNOTSUPP:
                    # No RTM_GETVLAN (Linux < 5.8, or no CONFIG_BRIDGE_VLAN_FILTERING):
                    # port_vlans asks with the old whole-namespace dump from now on.
                    self._old_vlan_dump = True
                    continue
                if strict:
                    raise KernelError(what=_describe(key), reason="%s (errno %d)" % (os.strerror(code), code))
                continue  # not kept: the read that needs it asks again and says why
            if key[0] == "fdb":
                self._seen[key] = None if code else _master_entry_raw(msgs)
            elif key[0] == "vlans":
                self._seen[key] = () if code else vlans_from_raw(msgs, key[1])  # gone: no VLANs
            elif key[0] == "vxlan":
                if not code:
                    self._seen[key] = _vxlan_links(msgs, key[1])
            elif code or not msgs:
                self._seen[key] = None
            else:
                self._remember_link(msgs[0])
                self._seen[key] = self._seen[("index", struct.unpack_from("=i", msgs[0], 20)[0])]

    def _encode(self, build):
        """The bytes of one request, as pyroute2 would send it (IPBatch compiles, never sends)."""
        if self._encoder is None:
            from pyroute2 import IPBatch
            self._encoder = IPBatch()
        self._encoder.reset()
        build(self._encoder)
        return bytes(self._encoder.batch)

    def _round_trip(self, requests):
        """Send every request (encoded messages) at once, collect every answer: [(raw replies, errno or 0)].

        Each request asks for an acknowledgement, so every one ends with an
        NLMSG_ERROR (0 = done); the kernel handles them in order. More than
        BATCH requests go in several round trips (the answers must fit the
        socket's buffer).
        """
        if len(requests) > BATCH:
            return [answer for i in range(0, len(requests), BATCH)
                    for answer in self._round_trip(requests[i:i + BATCH])]
        sock = self._netlink()
        # Our own sequence numbers, above pyroute2's pool (0xff-0xffff): its
        # allocator costs 50 us a number, and every answer is read here.
        first = self._seq
        self._seq = first + len(requests) if first + 2 * len(requests) < 0x7FFFFFFF else 0x10000000
        seqs = range(first, first + len(requests))
        data = bytearray()
        for seq, request in zip(seqs, requests):
            raw = bytearray(request)
            flags = struct.unpack_from("=H", raw, 6)[0] | NLM_F_ACK
            struct.pack_into("=HI", raw, 6, flags, seq)
            data += raw
        sock.sendto(bytes(data), (0, 0))
        where = {seq: i for i, seq in enumerate(seqs)}
        out = [([], None) for _ in seqs]
        left = len(seqs)
        while left:
            size = sock.recv_into(self._buf)
            for msg_type, seq, raw in _split(self._view[:size]):
                i = where.get(seq)
                if i is None or out[i][1] is not None:
                    continue  # a notification or somebody else's answer
                if msg_type == NLMSG_ERROR:
                    out[i] = (out[i][0], -struct.unpack_from("=i", raw, 16)[0])
                    left -= 1
                elif msg_type == NLMSG_DONE:  # a dump ends here (no acknowledgement follows)
                    # Its payload, when there is one, is the dump's status: 0 or -errno.
                    status = struct.unpack_from("=i", raw, 16)[0] if len(raw) >= 20 else 0
                    out[i] = (out[i][0], -status if status < 0 else 0)
                    left -= 1
                else:
                    out[i][0].append(raw)
        return out

    # --- status helpers (O(bridge), never used by the hook path) ----------
    def links(self):
        """Every link of the namespace: one dump on the batched path, decoded from the bytes."""
        (msgs, code), = self._round_trip([msg_link_dump()])
        if code:
            raise KernelError(what="ip link show", reason="%s (errno %d)" % (os.strerror(code), code))
        return [link_from_raw(m)[0] for m in msgs]

    def vxlan_ports(self, bridge_ifindex):
        """The VXLAN devices enslaved to this bridge: (Link, ...). One link dump the kernel filters.

        The kernel (>= 4.8) filters a link dump by IFLA_MASTER and the kind in
        IFLA_LINKINFO and sends only the matches, so this costs one request
        whatever the number of links; older kernels ignore the filter, hence
        the second check (_vxlan_links). Used once per bridge and run (the sticky rule).
        """
        return self._one(("vxlan", bridge_ifindex), vxlan=[bridge_ifindex])

    def locked_entries(self, port_ifindex):
        """MACs the bridge saw as sources on a locked MAB port and dropped: [(mac, vid)]. One dump.

        Decoded from the bytes: pyroute2's maps differ between 0.7.2 and 0.7.7
        and not every version knows NDA_FLAGS_EXT, the attribute that says so.
        """
        return sorted((entry.mac, entry.vlan) for entry in self.port_entries(port_ifindex) if entry.locked)

    def port_entries(self, port_ifindex):
        """The bridge (master) FDB entries pointing at one port: [FdbEntry]. One dump (port ownership checks)."""
        (msgs, code), = self._round_trip([msg_fdb_dump(port_ifindex)])
        if code:
            raise KernelError(what="bridge fdb show dev %d" % port_ifindex,
                              reason="%s (errno %d)" % (os.strerror(code), code))
        out = []
        for raw in msgs:
            entry = entry_from_raw(raw)
            if entry.ifindex == port_ifindex and not struct.unpack_from("=B", raw, 26)[0] & NTF_SELF:
                out.append(entry)
        return out

    def port_vlans(self, ifindex):
        """A port's VLAN membership: ((vid, pvid, untagged), ...). Kept until a VLAN write to the port.

        One RTM_GETVLAN dump filtered by the port's ifindex (``bridge vlan
        show dev PORT``): the kernel sends that port's VLANs only, so the cost
        does not grow with the bridge. ``prefetch(vlans=...)`` asks for every
        port of a domain in one round trip. Kernels without RTM_GETVLAN
        (before 5.8) get the old AF_BRIDGE link dump of every port.
        """
        key = ("vlans", ifindex)
        if key not in self._seen and not self._old_vlan_dump:
            self._fetch(dict(vlans=[ifindex]), strict=True)
        if key in self._seen:
            return self._seen[key]
        return self._port_vlans_from_link_dump(ifindex)

    def _port_vlans_from_link_dump(self, ifindex):
        """port_vlans on kernels without RTM_GETVLAN: an AF_BRIDGE link dump of every port, filtered here."""
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

    # --- writes ----------------------------------------------------------
    def execute_many(self, ops):
        """Carry out one port's plan.Ops: the only write path (apply, verify, rollback, teardown).

        The kernel handles every message of one send on its own and goes on
        after a failed one, so the ops go in stages (plan.stages): the entries
        and VLANs first; learning/flood off, the lock, removals and the flush
        only once every answer of the first stage says done. The first failure
        is raised (KernelError naming its op) once its stage's answers are in;
        later stages are not sent.
        """
        from fdbhook.plan import render, stages

        for stage in stages(list(ops)):
            for op in stage:
                self._written(op)
            try:
                answers = self._write([self._request(op) for op in stage])
            except Exception as exc:
                raise KernelError(what="; ".join(render(op) for op in stage), reason=_reason(exc)) from None
            for op, (_, code) in zip(stage, answers):
                if not code or (op.kind in ("fdb_del", "vlan_del") and code in (errno.ENOENT, errno.ENODEV)):
                    continue
                raise KernelError(what=render(op), reason="%s (errno %d)" % (os.strerror(code), code),
                                  errno=code)

    def announce(self, entries):
        """Have the bridge tell its listeners (FRR's zebra) of these static entries again; change nothing.

        One RTM_NEWNEIGH replace per entry (FdbEntry: port, MAC, VID, sticky)
        without NLM_F_CREATE, so an entry gone meanwhile stays gone (ENOENT,
        skipped), with state NUD_NOARP|NUD_REACHABLE: the bridge keeps it
        static on the same port with the same flags, but sees a state other
        than the one it reports, counts that as a change and sends
        RTM_NEWNEIGH. Returns how many entries it announced.
        """
        requests = [msg_fdb_write("touch", e.ifindex, e.mac, e.vlan, NTF_MASTER | (NTF_STICKY if e.sticky else 0))
                    for e in entries]
        announced = 0
        for entry, (_, code) in zip(entries, self._round_trip(requests) if requests else ()):
            if not code:
                announced += 1
            elif code not in (errno.ENOENT, errno.ENODEV):
                raise KernelError(what="announce %s on ifindex %d" % (entry.mac, entry.ifindex),
                                  reason="%s (errno %d)" % (os.strerror(code), code), errno=code)
        return announced

    def _write(self, requests):
        """One round trip of write requests; fdbhook.faults may fail one or kill the process after one."""
        if not faults.armed():
            return self._round_trip(requests)
        out, send, crash = [([], None)] * len(requests), [], False
        for i in range(len(requests)):
            code, crash = faults.kernel_request()
            if code:
                out[i] = ([], code)  # as if the kernel had answered so
            else:
                send.append(i)
            if crash:
                break
        for i, answer in zip(send, self._round_trip([requests[i] for i in send]) if send else ()):
            out[i] = answer
        if crash:
            faults.crash()
        return out

    def _request(self, op):
        """The encoded netlink request for one plan.Op."""
        if op.kind == "fdb_replace":
            flags = NTF_MASTER | (NTF_STICKY if op.sticky and self.sticky_supported else 0)
            return msg_fdb_write("replace", op.ifindex, op.mac, op.vlan, flags)
        if op.kind == "fdb_del":
            return msg_fdb_write("del", op.ifindex, op.mac, op.vlan, NTF_MASTER)
        if op.kind == "set_flags":
            return msg_brport_set(op.ifindex, _flag_attrs(op))
        if op.kind == "flush":
            return msg_brport_set(op.ifindex, [(IFLA_BRPORT_FLUSH, None)])
        if op.kind == "bridge_set":
            return msg_bridge_set(op.ifindex, op.vlan_filtering)
        if op.kind in ("vlan_add", "vlan_del"):
            flags = (BRIDGE_VLAN_INFO_PVID if op.pvid else 0) | (BRIDGE_VLAN_INFO_UNTAGGED if op.untagged else 0)
            cmd = "add" if op.kind == "vlan_add" else "del"
            return self._encode(lambda b: b.vlan_filter(cmd, index=op.ifindex,
                                                        vlan_info={"vid": op.vlan, "flags": flags}))
        raise ValueError("unknown op %r" % op.kind)

    def _written(self, op):
        """Forget the reads that ``op`` may change: its port's link, its entry (a flush: every entry)."""
        if op.kind == "bridge_set":  # the bridge's filtering changes what every entry and VLAN read means
            self.forget()
            return
        self._seen.pop(("index", op.ifindex), None)
        self._seen.pop(("name", op.port), None)
        if op.kind in ("fdb_replace", "fdb_del"):
            self._seen.pop(("fdb", op.mac, op.bridge_ifindex, op.vlan or 0), None)
        elif op.kind in ("flush", "vlan_add", "vlan_del"):
            for key in [key for key in self._seen if key[0] == "fdb"]:
                del self._seen[key]
            self._seen.pop(("vlans", op.ifindex), None)


def kernel_version(release):
    """(major, minor) of a kernel release string ('6.1.0-18-amd64' -> (6, 1)); (0, 0) if unreadable."""
    parts = []
    for piece in release.split(".")[:2]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) if len(parts) == 2 else (0, 0)


def _vlan_protocol_present(raw):
    """Does a bridge's RTM_NEWLINK carry IFLA_BR_VLAN_PROTOCOL (CONFIG_BRIDGE_VLAN_FILTERING)?"""
    a = _attrs(raw, 32)
    info = _attrs(a[IFLA_LINKINFO]) if IFLA_LINKINFO in a else {}
    data = _attrs(info[IFLA_INFO_DATA]) if IFLA_INFO_DATA in info else {}
    return IFLA_BR_VLAN_PROTOCOL in data


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


class FrameSocket:
    """Frames one port receives that a classic BPF ``program`` accepts (fdbhook.firstframe).

    An AF_PACKET socket opened with protocol 0 (nothing arrives yet), given
    its filter and PACKET_IGNORE_OUTGOING (4.20+; the filter drops outgoing
    frames on older kernels too), then bound to the port's ifindex: from then
    on a frame the port receives (the guest sent it) and the filter accepts
    makes the socket readable. Only arrivals count: nothing in a frame is read.
    When the port goes away the socket reports an error (POLLERR, ENETDOWN).
    """

    SO_ATTACH_FILTER, SOL_PACKET, PACKET_IGNORE_OUTGOING, ETH_P_ALL = 26, 263, 23, 0x0003
    SO_TIMESTAMPNS = 35  # asm-generic/socket.h (SO_TIMESTAMPNS_OLD; its cmsg is a struct timespec)

    @staticmethod
    def unavailable():
        """Why this process cannot open a packet socket ("" if it can): no CAP_NET_RAW, or AF_PACKET
        filtered (systemd's CapabilityBoundingSet=, RestrictAddressFamilies=)."""
        import socket

        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
        except OSError as exc:
            return "AF_PACKET socket: %s (needs CAP_NET_RAW and AF_PACKET)" % (exc.strerror or exc)
        return ""

    def __init__(self, ifindex, program):
        import ctypes
        import socket

        self.ifindex = ifindex
        self.received = None  # wall-clock time the kernel received the first frame the last drain() read
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *ins) for ins in program))
            fprog = struct.pack("HL", len(program), ctypes.addressof(code))  # struct sock_fprog
            self._sock.setsockopt(socket.SOL_SOCKET, self.SO_ATTACH_FILTER, fprog)
            try:
                self._sock.setsockopt(self.SOL_PACKET, self.PACKET_IGNORE_OUTGOING, 1)
            except OSError:
                pass
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            self._sock.setsockopt(socket.SOL_SOCKET, self.SO_TIMESTAMPNS, 1)
            # struct sockaddr_ll by ifindex (Python's own bind takes a name, which may be renamed meanwhile)
            addr = struct.pack("=HHiHBB8s", socket.AF_PACKET, socket.htons(self.ETH_P_ALL), ifindex, 0, 0, 0, b"")
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.bind(self._sock.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, "bind to ifindex %d: %s" % (ifindex, os.strerror(err)))
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self):
        return self._sock.fileno()

    def drain(self):
        """How many accepted frames were waiting (0: none). OSError once the port is gone.

        ``received`` is then when the kernel received the first of them (its
        timestamp, wall clock), None if none came.
        """
        count, self.received = 0, None
        while True:
            try:
                _, ancillary, _, _ = self._sock.recvmsg(128, 64)
            except BlockingIOError:
                return count
            if count == 0:
                self.received = self._timestamp(ancillary)
            count += 1

    @classmethod
    def _timestamp(cls, ancillary):
        import socket

        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == cls.SO_TIMESTAMPNS and len(data) >= 16:
                sec, nsec = struct.unpack("=qq", data[:16])
                return sec + nsec / 1e9
        return None

    def close(self):
        self._sock.close()


# --- requests, encoded: the hot path's messages without pyroute2's request
# compiler (0.1-0.5 ms a message in 0.7); tests/unit/test_kernel_adapter.py
# checks every one against the bytes pyroute2's IPBatch makes for it.
RTM_NEWLINK, RTM_GETLINK, RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 16, 18, 28, 29, 30
RTM_NEWVLAN, RTM_GETVLAN = 112, 114
NLM_F_REQUEST, NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x01, 0x100, 0x400, 0x300
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_INFO_KIND, IFLA_INFO_SLAVE_DATA = 3, 10, 18, 1, 5
IFLA_BRPORT_LEARNING, IFLA_BRPORT_UNICAST_FLOOD, IFLA_BRPORT_FLUSH = 8, 9, 24
IFLA_BRPORT_LOCKED, IFLA_BRPORT_MAB = 39, 40
NDA_LLADDR, NDA_VLAN, NDA_MASTER = 2, 5, 9


def _nla(kind, payload=b""):
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _nlmsg(msg_type, flags, body):
    return struct.pack("=IHHII", 16 + len(body), msg_type, flags, 0, 0) + body


def _ifinfmsg(ifindex):
    return struct.pack("=BxHiII", 0, 0, ifindex, 0, 0)


def _ndmsg(ifindex, state=0, flags=0):
    return struct.pack("=BxxxiHBB", AF_BRIDGE, ifindex, state, flags, 0)


def _lladdr(mac):
    return _nla(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))


def _vid(vlan):
    return _nla(NDA_VLAN, struct.pack("=H", vlan)) if vlan else b""


def msg_link_get(name=None, ifindex=0):
    """RTM_GETLINK for one link, by name or by ifindex."""
    body = _ifinfmsg(ifindex)
    if name is not None:
        body += _nla(IFLA_IFNAME, name.encode() + b"\0")
    return _nlmsg(RTM_GETLINK, NLM_F_REQUEST, body)


def msg_fdb_get(mac, bridge_ifindex, vlan=0):
    """RTM_GETNEIGH (AF_BRIDGE): the bridge's entry for MAC on VLAN (``bridge fdb get MAC br BR``)."""
    body = _ndmsg(0) + _lladdr(mac) + _nla(NDA_MASTER, struct.pack("=I", bridge_ifindex)) + _vid(vlan)
    return _nlmsg(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_ACK, body)


def msg_fdb_write(command, ifindex, mac, vlan, flags):
    """RTM_NEWNEIGH replace (static: NUD_NOARP) or RTM_DELNEIGH of a master entry on a port.

    ``touch``: a replace of an existing entry only (no NLM_F_CREATE) that the bridge notifies
    although nothing changes (Kernel.announce)."""
    if command == "touch":
        body = _ndmsg(ifindex, NUD_NOARP | NUD_REACHABLE, flags) + _lladdr(mac) + _vid(vlan)
        return _nlmsg(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE, body)
    body = _ndmsg(ifindex, NUD_NOARP, flags) + _lladdr(mac) + _vid(vlan)
    if command == "replace":
        return _nlmsg(RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE, body)
    return _nlmsg(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, body)


def msg_brport_set(ifindex, attrs):
    """RTM_NEWLINK setting bridge-port attributes [(IFLA_BRPORT_*, u8 value or None for a flag)]."""
    data = b"".join(_nla(kind, b"" if value is None else struct.pack("B", value)) for kind, value in attrs)
    info = _nla(IFLA_INFO_KIND, b"bridge_slave\0") + _nla(IFLA_INFO_SLAVE_DATA, data)
    return _nlmsg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfmsg(ifindex) + _nla(IFLA_LINKINFO, info))


def msg_bridge_set(bridge_ifindex, vlan_filtering):
    """RTM_NEWLINK setting a bridge's IFLA_BR_VLAN_FILTERING (``ip link set dev BR type bridge vlan_filtering N``)."""
    data = _nla(IFLA_BR_VLAN_FILTERING, struct.pack("B", int(vlan_filtering)))
    info = _nla(IFLA_INFO_KIND, b"bridge\0") + _nla(IFLA_INFO_DATA, data)
    return _nlmsg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfmsg(bridge_ifindex) + _nla(IFLA_LINKINFO, info))


def msg_fdb_dump(port_ifindex):
    """RTM_GETNEIGH (AF_BRIDGE) dump of one port's FDB entries (``bridge fdb show dev PORT``).

    The header is an ifinfomsg, as iproute2 sends it: without strict checking
    (NETLINK_GET_STRICT_CHK, which this adapter does not set) the kernel
    takes the port filter only from an ifinfomsg's ifi_index and answers a
    bare ndmsg with every entry of every bridge (100,000 entries on an uplink:
    half a second to decode), whatever its ndm_ifindex says.
    """
    return _nlmsg(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, struct.pack("=BxHiII", AF_BRIDGE, 0, port_ifindex, 0, 0))


def msg_link_dump():
    """RTM_GETLINK dump of every link (``ip link show``)."""
    return _nlmsg(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, struct.pack("=BxHiII", 0, 0, 0, 0, 0))


def msg_vxlan_ports(bridge_ifindex):
    """RTM_GETLINK dump of the VXLAN devices enslaved to a bridge (the kernel filters by master and kind)."""
    info = _nla(IFLA_LINKINFO, _nla(IFLA_INFO_KIND, b"vxlan\0"))
    body = struct.pack("=BxHiII", 0, 0, 0, 0, 0) + _nla(IFLA_MASTER, struct.pack("=I", bridge_ifindex)) + info
    return _nlmsg(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, body)


def vxlan_driver_loaded():
    """Can a VXLAN device exist? /sys/module/vxlan is there when the driver is loaded or built in
    (it has module parameters, so a built-in vxlan shows there too)."""
    return os.path.exists("/sys/module/vxlan")


def msg_vlan_dump(port_ifindex):
    """RTM_GETVLAN (AF_BRIDGE) dump of one port's VLANs (``bridge vlan show dev PORT``; Linux >= 5.8).

    struct br_vlan_msg {u8 family; u8 reserved1; u16 reserved2; u32 ifindex}:
    with ifindex set the kernel dumps that device only (br_vlan_rtm_dump).
    """
    return _nlmsg(RTM_GETVLAN, NLM_F_REQUEST | NLM_F_DUMP, struct.pack("=BBHI", AF_BRIDGE, 0, 0, port_ifindex))


def _vxlan_links(msgs, bridge_ifindex):
    # Kernels before 4.8 ignore the dump filter: check again here.
    links = [link_from_raw(m)[0] for m in msgs]
    return tuple(link for link in links if link.master == bridge_ifindex and link.kind == "vxlan")


def _flag_attrs(op):
    """(IFLA_BRPORT_*, value) of a set_flags op, only the flags it changes."""
    return [(kind, int(getattr(op, attr))) for attr, kind in (
        ("learning", IFLA_BRPORT_LEARNING), ("flood", IFLA_BRPORT_UNICAST_FLOOD),
        ("locked", IFLA_BRPORT_LOCKED), ("mab", IFLA_BRPORT_MAB)) if getattr(op, attr) is not None]


def _describe(key):
    """The iproute2 command that would have made a read (for error messages)."""
    kind = key[0]
    if kind == "name":
        return "ip link show dev %s" % key[1]
    if kind == "index":
        return "ip link show (ifindex %d)" % key[1]
    if kind == "fdb":
        return "bridge fdb get %s br %d%s" % (key[1], key[2], " vlan %d" % key[3] if key[3] else "")
    if kind == "vlans":
        return "bridge vlan show (ifindex %d)" % key[1]
    return "ip link show master %d type vxlan" % key[1]


# --- answers, decoded: the few attributes fdbhook reads, straight from the
# bytes (pyroute2 0.7 builds an object per attribute: 0.5 ms a link message).
# The kernel tier checks them against link_from_msg/entry_from_msg.
IFLA_ADDRESS, IFLA_LINK, IFLA_PROMISCUITY, IFLA_LINK_NETNSID = 1, 5, 30, 37
IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_BR_VLAN_FILTERING, IFLA_BR_VLAN_PROTOCOL = 2, 4, 7, 8
NDA_FLAGS_EXT = 15


def _split(data):
    """(type, sequence number, message bytes) of each netlink message in one receive."""
    pos = 0
    while pos + 16 <= len(data):
        size, msg_type, _, seq = struct.unpack_from("=IHHI", data, pos)
        if size < 16:
            return
        yield msg_type, seq, bytes(data[pos:pos + size])
        pos += (size + 3) & ~3


def _attrs(data, start=0, end=None):
    """{attribute type: payload} of the attributes in data[start:end]."""
    out = {}
    end = len(data) if end is None else end
    while start + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, start)
        if size < 4:
            break
        out[kind & 0x3FFF] = data[start + 4:start + size]  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        start += (size + 3) & ~3
    return out


def _u32(payload):
    return struct.unpack_from("=I", payload)[0] if payload is not None and len(payload) >= 4 else None


def _text(payload):
    return payload.split(b"\0", 1)[0].decode() if payload is not None else None


def _flag(attrs, kind):
    return bool(attrs[kind][0]) if kind in attrs and attrs[kind] else None


def link_from_raw(data):
    """(Link, bridge vlan_filtering or None) from an RTM_NEWLINK message's bytes: link_from_msg's twin."""
    ifindex = struct.unpack_from("=i", data, 20)[0]
    a = _attrs(data, 32)
    info = _attrs(a[IFLA_LINKINFO]) if IFLA_LINKINFO in a else {}
    kind, slave_kind = _text(info.get(IFLA_INFO_KIND)), _text(info.get(IFLA_INFO_SLAVE_KIND))
    peer = _u32(a.get(IFLA_LINK))
    if IFLA_LINK_NETNSID in a or peer == ifindex:
        peer = None
    is_port = slave_kind == "bridge"
    slave = _attrs(info[IFLA_INFO_SLAVE_DATA]) if is_port and IFLA_INFO_SLAVE_DATA in info else {}
    filtering = None
    if kind == "bridge":
        data_attrs = _attrs(info[IFLA_INFO_DATA]) if IFLA_INFO_DATA in info else {}
        filtering = bool(_flag(data_attrs, IFLA_BR_VLAN_FILTERING))
    mac = a.get(IFLA_ADDRESS)
    link = Link(name=_text(a.get(IFLA_IFNAME)), ifindex=ifindex, kind=kind, master=_u32(a.get(IFLA_MASTER)) or None,
                peer=peer or None, mac=":".join("%02x" % b for b in mac) if mac is not None else None,
                promiscuity=_u32(a.get(IFLA_PROMISCUITY)) or 0, is_bridge_port=is_port,
                learning=_flag(slave, IFLA_BRPORT_LEARNING), flood=_flag(slave, IFLA_BRPORT_UNICAST_FLOOD),
                locked=_flag(slave, IFLA_BRPORT_LOCKED), mab=_flag(slave, IFLA_BRPORT_MAB))
    return link, filtering


def entry_from_raw(data):
    """FdbEntry from an RTM_NEWNEIGH (AF_BRIDGE) message's bytes: entry_from_msg's twin."""
    ifindex, state, flags = struct.unpack_from("=iHB", data, 20)
    a = _attrs(data, 28)
    mac = a.get(NDA_LLADDR)
    vlan = struct.unpack_from("=H", a[NDA_VLAN])[0] if NDA_VLAN in a else 0
    return FdbEntry(mac=":".join("%02x" % b for b in mac) if mac is not None else None, ifindex=ifindex,
                    static=bool(state & NUD_NOARP) and not state & NUD_PERMANENT, local=bool(state & NUD_PERMANENT),
                    sticky=bool(flags & NTF_STICKY), vlan=vlan,
                    locked=bool((_u32(a.get(NDA_FLAGS_EXT)) or 0) & NTF_EXT_LOCKED),
                    extern_learn=bool(flags & NTF_EXT_LEARNED))


# RTM_NEWVLAN answers (linux/if_bridge.h): after struct br_vlan_msg (8 bytes),
# BRIDGE_VLANDB_ENTRY nests, each with ENTRY_INFO (struct bridge_vlan_info
# {u16 flags; u16 vid}) and, for a run of VLANs with the same flags and
# options, ENTRY_RANGE (u16: the last vid of the run).
BRIDGE_VLANDB_ENTRY, BRIDGE_VLANDB_ENTRY_INFO, BRIDGE_VLANDB_ENTRY_RANGE = 1, 1, 2


def vlans_from_raw(msgs, ifindex):
    """((vid, pvid, untagged), ...) of ``ifindex`` from RTM_NEWVLAN messages' bytes, sorted.

    A range shares the flags of its first VLAN; the PVID is one VLAN, so
    PVID counts for the first vid of an entry only (the kernel never puts
    the PVID inside a range).
    """
    out = []
    for raw in msgs:
        if len(raw) < 24 or struct.unpack_from("=H", raw, 4)[0] != RTM_NEWVLAN:
            continue
        if struct.unpack_from("=I", raw, 20)[0] != ifindex & 0xFFFFFFFF:
            continue
        pos, end = 24, struct.unpack_from("=I", raw, 0)[0]
        while pos + 4 <= min(end, len(raw)):
            size, kind = struct.unpack_from("=HH", raw, pos)
            if size < 4:
                break
            if kind & 0x3FFF == BRIDGE_VLANDB_ENTRY:
                entry = _attrs(raw, pos + 4, pos + size)
                info = entry.get(BRIDGE_VLANDB_ENTRY_INFO)
                if info is not None and len(info) >= 4:
                    flags, vid = struct.unpack_from("=HH", info)
                    last = entry.get(BRIDGE_VLANDB_ENTRY_RANGE)
                    last = struct.unpack_from("=H", last)[0] if last is not None and len(last) >= 2 else vid
                    for v in range(vid, max(vid, last) + 1):
                        out.append((v, bool(flags & BRIDGE_VLAN_INFO_PVID) and v == vid,
                                    bool(flags & BRIDGE_VLAN_INFO_UNTAGGED)))
            pos += (size + 3) & ~3
    return tuple(sorted(out))


def _master_entry_raw(msgs):
    for raw in msgs:
        if not struct.unpack_from("=B", raw, 26)[0] & NTF_SELF:
            return entry_from_raw(raw)
    return None


def _master_entry(msgs):  # pyroute2's twin of _master_entry_raw (tests compare the two)
    """The bridge's own (master) entry among an fdb get's answers, or None."""
    for msg in msgs:
        if not msg["flags"] & NTF_SELF:
            return entry_from_msg(msg)
    return None


def _vlan_filtering(msg):
    info = msg.get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    return bool(data is not None and data.get_attr("IFLA_BR_VLAN_FILTERING"))


def _reason(exc):
    code = _nl_errno(exc)
    if isinstance(code, int) and code > 0:
        import os
        return "%s (errno %d)" % (os.strerror(code), code)
    return str(exc) or exc.__class__.__name__
