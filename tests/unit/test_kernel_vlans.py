"""The adapter's VLAN reads (issue 20): one port's RTM_GETVLAN dump, decoded from the bytes, kept until a VLAN write.

The bytes here are built as the kernel builds them (net/bridge/br_vlan.c,
br_vlan_fill_vids); tests/fullkernel/inner_reads.py checks the decoder
against pyroute2 and ``bridge -j vlan show`` on Debian's 6.1 and 6.12.
"""

import errno
import struct

from fdbhook import kernel as K
from fdbhook.model import Op


def nla(kind, payload):
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def entry(vid, flags=0, last=None):
    body = nla(K.BRIDGE_VLANDB_ENTRY_INFO, struct.pack("=HH", flags, vid))
    if last is not None:
        body += nla(K.BRIDGE_VLANDB_ENTRY_RANGE, struct.pack("=H", last))
    body += nla(3, b"\x03")  # BRIDGE_VLANDB_ENTRY_STATE: forwarding (ignored)
    return nla(K.BRIDGE_VLANDB_ENTRY | 0x8000, body)  # NLA_F_NESTED, as the kernel sets it


def newvlan(ifindex, *entries, seq=7):
    body = struct.pack("=BBHI", K.AF_BRIDGE, 0, 0, ifindex) + b"".join(entries)
    return struct.pack("=IHHII", 16 + len(body), K.RTM_NEWVLAN, 2, seq, 0) + body  # NLM_F_MULTI


def done(seq, status=0):
    return struct.pack("=IHHIIi", 20, K.NLMSG_DONE, 2, seq, 0, status)


PVID_UNTAGGED = K.BRIDGE_VLAN_INFO_PVID | K.BRIDGE_VLAN_INFO_UNTAGGED


def test_request_is_a_dump_of_one_port():
    raw = K.msg_vlan_dump(9)
    size, kind, flags = struct.unpack_from("=IHH", raw)
    assert (size, kind, flags) == (24, 114, K.NLM_F_REQUEST | K.NLM_F_DUMP)
    assert struct.unpack_from("=BBHI", raw, 16) == (K.AF_BRIDGE, 0, 0, 9)


def test_ranges_are_expanded_and_the_pvid_is_one_vlan():
    msgs = [newvlan(9, entry(1, PVID_UNTAGGED), entry(100, 0, 103), entry(200, K.BRIDGE_VLAN_INFO_UNTAGGED)),
            newvlan(9, entry(300, K.BRIDGE_VLAN_INFO_PVID, 301)),  # a second message of the same dump
            newvlan(4, entry(5))]  # another device's answer: not ours
    assert K.vlans_from_raw(msgs, 9) == (
        (1, True, True), (100, False, False), (101, False, False), (102, False, False), (103, False, False),
        (200, False, True), (300, True, False), (301, False, False))
    assert K.vlans_from_raw([newvlan(9)], 9) == ()


class Answers:
    """Stands in for the socket round trip: answers from a table, counts round trips."""

    def __init__(self, answers):
        self.answers, self.sent = answers, []

    def __call__(self, requests):
        self.sent.append(list(requests))
        return [self.answers(raw) for raw in requests]


def kernel_with(answers):
    k = K.Kernel()
    k._round_trip = Answers(answers)
    return k


def test_one_round_trip_for_every_port_and_kept_until_a_vlan_write():
    def answer(raw):
        ifindex = struct.unpack_from("=I", raw, 20)[0]
        return [newvlan(ifindex, entry(ifindex * 10, PVID_UNTAGGED))], 0

    k = kernel_with(answer)
    k.prefetch(vlans=[7, 8, 7])
    assert len(k._round_trip.sent) == 1 and len(k._round_trip.sent[0]) == 2
    assert k.port_vlans(7) == ((70, True, True),) and k.port_vlans(8) == ((80, True, True),)
    assert len(k._round_trip.sent) == 1
    k._written(Op(kind="vlan_add", vlan=5, port="vnet0", ifindex=7, bridge="br0", bridge_ifindex=2))
    assert k.port_vlans(8) == ((80, True, True),) and len(k._round_trip.sent) == 1
    assert k.port_vlans(7) == ((70, True, True),) and len(k._round_trip.sent) == 2
    k.forget()
    k.port_vlans(8)
    assert len(k._round_trip.sent) == 3


def test_a_gone_port_has_no_vlans_and_old_kernels_use_the_link_dump(monkeypatch):
    k = kernel_with(lambda raw: ([], errno.ENODEV))
    assert k.port_vlans(7) == ()
    k = kernel_with(lambda raw: ([], errno.EINVAL))  # not a bridge port
    assert k.port_vlans(7) == ()
    k = kernel_with(lambda raw: ([], errno.EOPNOTSUPP))  # no RTM_GETVLAN
    monkeypatch.setattr(K.Kernel, "_port_vlans_from_link_dump", lambda self, ifindex: ((1, True, True),))
    assert k.port_vlans(7) == ((1, True, True),)
    k.forget()
    assert k.port_vlans(7) == ((1, True, True),)
    assert len(k._round_trip.sent) == 1  # asked once: from then on the old way


def test_a_dump_error_in_done_is_the_answers_errno():
    """NLMSG_DONE carries a dump's status (-errno): the batched path reports it like an acknowledgement's."""
    k = K.Kernel()

    class Sock:
        def __init__(self):
            self.data = b""

        def sendto(self, data, addr):
            seq = struct.unpack_from("=I", data, 8)[0]
            self.data = done(seq, -errno.ENODEV) + done(seq + 1, 0)

        def recv_into(self, buf):
            buf[:len(self.data)] = self.data
            return len(self.data)

    k._sock = Sock()
    assert k._round_trip([K.msg_vlan_dump(7), K.msg_vlan_dump(8)]) == [([], errno.ENODEV), ([], 0)]


def test_no_vxlan_driver_no_vxlan_dump(monkeypatch):
    k = kernel_with(lambda raw: ([], 0))
    monkeypatch.setattr(K, "vxlan_driver_loaded", lambda: False)
    assert k.vxlan_ports(3) == ()
    assert k._round_trip.sent == []
    monkeypatch.setattr(K, "vxlan_driver_loaded", lambda: True)
    k.forget()
    assert k.vxlan_ports(3) == ()
    assert len(k._round_trip.sent) == 1
