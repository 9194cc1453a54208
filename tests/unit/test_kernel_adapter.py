"""The netlink adapter's exact requests, the link-event parser and the hook wire format."""

import struct
import sys

import pytest

from fdbhook import kernel as K
from fdbhook.client import encode_request, pack, unpack
from fdbhook.daemon import decode_request
from fdbhook.model import Op


def request(op):
    """The bytes the one write path sends for ``op`` (as the batched path sends them)."""
    return with_ack(K.Kernel()._request(op))


COMMON = dict(port="vnet0", ifindex=7, bridge="br0", bridge_ifindex=2)
MAC = "52:54:00:00:00:01"


def test_static_entry_is_noarp_master_never_pyroute2s_permanent_default():
    assert request(Op(kind="fdb_replace", mac=MAC, sticky=True, **COMMON)) == pyroute2_bytes(
        lambda b: b.fdb("replace", ifindex=7, lladdr=MAC, state=0x40, flags=0x04 | 0x40))
    assert request(Op(kind="fdb_replace", mac=MAC, vlan=42, **COMMON)) == pyroute2_bytes(
        lambda b: b.fdb("replace", ifindex=7, lladdr=MAC, state=0x40, flags=0x04, vlan=42))


def test_delete_names_the_same_entry():
    assert request(Op(kind="fdb_del", mac=MAC, vlan=42, **COMMON)) == pyroute2_bytes(
        lambda b: b.fdb("del", ifindex=7, lladdr=MAC, state=0x40, flags=0x04, vlan=42))


def test_flags_go_in_one_request_and_flush_keeps_static_entries():
    assert request(Op(kind="set_flags", learning=False, flood=False, **COMMON)) == pyroute2_bytes(
        lambda b: b.brport("set", index=7, learning=0, unicast_flood=0))
    assert request(Op(kind="set_flags", flood=True, **COMMON)) == pyroute2_bytes(
        lambda b: b.brport("set", index=7, unicast_flood=1))
    assert request(Op(kind="flush", **COMMON)) == pyroute2_bytes(lambda b: b.brport("set", index=7, flush=True))


def test_vlan_membership_flags():
    assert request(Op(kind="vlan_add", vlan=42, pvid=True, untagged=True, **COMMON)) == pyroute2_bytes(
        lambda b: b.vlan_filter("add", index=7, vlan_info={"vid": 42, "flags": 0x2 | 0x4}))
    assert request(Op(kind="vlan_del", vlan=100, **COMMON)) == pyroute2_bytes(
        lambda b: b.vlan_filter("del", index=7, vlan_info={"vid": 100, "flags": 0}))


def test_bridge_vlan_filtering_goes_through_the_one_write_path():
    for on in (True, False):
        assert request(Op(kind="bridge_set", port="br0", ifindex=2, vlan_filtering=on)) == pyroute2_bytes(
            lambda b: b.link("set", index=2, kind="bridge", br_vlan_filtering=int(on)))


def test_capabilities_come_from_the_kernel_version():
    assert K.Kernel.capabilities("4.19.0-27-amd64") == {"sticky": False, "locked": False, "mab": False}
    assert K.Kernel.capabilities("6.1.0-18-amd64") == {"sticky": True, "locked": True, "mab": False}
    assert K.Kernel.capabilities("6.12.1") == {"sticky": True, "locked": True, "mab": True}
    assert K.Kernel.capabilities("garbage") == {"sticky": False, "locked": False, "mab": False}


def _rta(kind, value):
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((4 - length % 4) % 4)


def _link_msg(mtype, index, name=None, master=None, family=0):
    attrs = b""
    if name is not None:
        attrs += _rta(3, name.encode() + b"\0")
    if master is not None:
        attrs += _rta(10, master.to_bytes(4, sys.byteorder))
    body = struct.pack("=BxHiII", family, 1, index, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def test_link_events_are_parsed_by_hand():
    data = (_link_msg(16, 12, "vnet3", 5) + _link_msg(17, 9, "vnet1") + _link_msg(16, 12, "vnet3", 5, family=7)
            + _link_msg(24, 1))
    assert K.LinkMonitor.parse(data) == [("new", 12, "vnet3", 5), ("del", 9, "vnet1", 0)]
    assert K.LinkMonitor.parse(b"\x01\x02") == []


def test_wire_format_round_trip():
    raw = encode_request("qemu", ["web1", "started", "begin", "-"], b"<domain/>")
    assert raw.startswith(b"FDB1")
    assert decode_request(raw) == ("qemu", ["web1", "started", "begin", "-"], b"<domain/>")
    assert unpack(pack(b"0", b"", b"err"), 3) == [b"0", b"", b"err"]
    with pytest.raises(ValueError):
        unpack(b"XXXX" + raw[4:], 3)
    with pytest.raises(ValueError):
        unpack(raw[:-3], 3)


# --- the batched path's own encoder, byte for byte what pyroute2 would send -------------

def pyroute2_bytes(build):
    """What pyroute2's request compiler (IPBatch: encodes, never sends) makes of one request."""
    K._teach_pyroute2()
    from pyroute2 import IPBatch

    batch = IPBatch()
    build(batch)
    return with_ack(bytes(batch.batch))


def with_ack(raw):
    """A request as the batched path sends it: always asking for an acknowledgement (pyroute2 0.7.2 asks
    none for a link get, 0.7.7 does), sequence number and pid zero until sent."""
    flags = struct.unpack_from("=H", raw, 6)[0] | K.NLM_F_ACK
    return raw[:6] + struct.pack("=H", flags) + b"\0" * 8 + raw[16:]


@pytest.mark.parametrize("ours, theirs", [
    (K.msg_link_get(name="vnet0"), lambda b: b.link("get", ifname="vnet0")),
    (K.msg_link_get(ifindex=5), lambda b: b.link("get", index=5)),
    (K.msg_fdb_get("52:54:00:00:00:01", 3), lambda b: b.fdb("get", ifindex=0, lladdr="52:54:00:00:00:01", master=3)),
    (K.msg_fdb_get("52:54:00:00:00:01", 3, 10),
     lambda b: b.fdb("get", ifindex=0, lladdr="52:54:00:00:00:01", master=3, vlan=10)),
    (K.msg_fdb_write("replace", 4, "52:54:00:00:00:01", 0, K.NTF_MASTER | K.NTF_STICKY),
     lambda b: b.fdb("replace", ifindex=4, lladdr="52:54:00:00:00:01", state=K.NUD_NOARP, flags=0x44)),
    (K.msg_fdb_write("replace", 4, "52:54:00:00:00:01", 42, K.NTF_MASTER),
     lambda b: b.fdb("replace", ifindex=4, lladdr="52:54:00:00:00:01", state=K.NUD_NOARP, flags=0x04, vlan=42)),
    (K.msg_fdb_write("del", 4, "52:54:00:00:00:01", 0, K.NTF_MASTER),
     lambda b: b.fdb("del", ifindex=4, lladdr="52:54:00:00:00:01", state=K.NUD_NOARP, flags=0x04)),
    (K.msg_brport_set(4, [(K.IFLA_BRPORT_LEARNING, 0), (K.IFLA_BRPORT_UNICAST_FLOOD, 0)]),
     lambda b: b.brport("set", index=4, learning=0, unicast_flood=0)),
    (K.msg_brport_set(4, [(K.IFLA_BRPORT_LOCKED, 1), (K.IFLA_BRPORT_MAB, 1), (K.IFLA_BRPORT_LEARNING, 1)]),
     lambda b: b.brport("set", index=4, locked=1, mab=1, learning=1)),
    (K.msg_brport_set(4, [(K.IFLA_BRPORT_FLUSH, None)]), lambda b: b.brport("set", index=4, flush=True)),
], ids=["link-name", "link-index", "fdb-get", "fdb-get-vlan", "fdb-replace-sticky", "fdb-replace-vlan",
        "fdb-del", "brport-flags", "brport-lock-mab", "brport-flush"])
def test_batched_requests_are_what_pyroute2_would_send(ours, theirs):
    assert with_ack(ours) == pyroute2_bytes(theirs)


def test_an_ops_batch_request_matches_its_one_by_one_twin():
    k = K.Kernel()
    op = Op(kind="set_flags", learning=False, flood=False, locked=True, **COMMON)
    assert k._request(op) == K.msg_brport_set(7, [(K.IFLA_BRPORT_LEARNING, 0), (K.IFLA_BRPORT_UNICAST_FLOOD, 0),
                                                  (K.IFLA_BRPORT_LOCKED, 1)])


TEACH_AFTER_PARSE = """
from fdbhook import kernel as K
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
data = K._nla(K.IFLA_BRPORT_LEARNING, b"\\1") + K._nla(K.IFLA_BRPORT_LOCKED, b"\\1")
info = K._nla(K.IFLA_INFO_SLAVE_KIND, b"bridge\\0") + K._nla(K.IFLA_INFO_SLAVE_DATA, data)
raw = K._nlmsg(K.RTM_NEWLINK, 0, K._ifinfmsg(7) + K._nla(K.IFLA_IFNAME, b"vnet0\\0") + K._nla(K.IFLA_LINKINFO, info))
def decode():
    msg = ifinfmsg(raw)
    msg.decode()
    return K.link_from_msg(msg).locked
before = decode()  # pyroute2 compiles its maps here, before fdbhook taught them
K._teach_pyroute2()
print(before, decode(), K.link_from_raw(raw)[0].locked)
"""


def test_teaching_pyroute2_works_after_it_parsed_a_message():
    """A process that parsed a link message with pyroute2 before fdbhook's first (a test reading with
    pyroute2 itself) still decodes the port's lock afterwards (pyroute2 keeps compiled maps per class)."""
    import os
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", TEACH_AFTER_PARSE], capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=repo))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["None", "True", "True"]
