"""Kernel tier: the engine's netlink round trips per NIC (issue 14), counted on a real bridge.

A round trip is one send followed by waiting for its answers: one request of
pyroute2's (``nlm_request``) or one batch of the adapter's (``_round_trip``).
A long-lived adapter (as in fdbhookd) that has seen the bridge before needs
at most 3 for a NIC that needs changes (read, write, verify) and 1 for a whole
domain that is already right. The results are checked with iproute2.
"""

import subprocess

import pytest

from fdbhook import domxml
from fdbhook.config import parse_config
from fdbhook.engine import apply_domain, teardown_domain
from fdbhook.kernel import Kernel
from fdbhook.lab import in_netns
from fdbhook.state import Store

pytestmark = pytest.mark.root


def domain(n):
    nics = "".join("<interface type='bridge'><mac address='52:54:00:00:0b:%02x'/><source bridge='br0'/>"
                   "<target dev='vnet%d'/><alias name='net%d'/></interface>" % (i + 1, i, i) for i in range(n))
    return domxml.parse_domain(("<domain type='kvm'><name>rt%d</name><devices>%s</devices></domain>"
                                % (n, nics)).encode())


class Counted:
    """Counts the adapter's round trips."""

    def __init__(self, kernel):
        self.trips = 0
        ipr = kernel.ipr
        plain, batch = ipr.nlm_request, kernel._round_trip

        def one(*args, **kw):
            self.trips += 1
            return plain(*args, **kw)

        def many(requests):
            self.trips += 1
            return batch(requests)

        ipr.nlm_request = one
        kernel._round_trip = many


@pytest.mark.parametrize("nics", [1, 16])
def test_round_trips_per_nic(lab, tmp_path, nics):
    lab.add_bridge("br0")
    for i in range(nics):
        lab.ip("tuntap", "add", "vnet%d" % i, "mode", "tap")
        # As libvirt makes them: the NIC's MAC with 0xfe first (taken at once, no FDB dump: policy.port_problem).
        lab.ip("link", "set", "vnet%d" % i, "address", "fe:54:00:00:0b:%02x" % (i + 1))
        lab.ip("link", "set", "vnet%d" % i, "master", "br0")
    config = parse_config("[manage]\nbridges = br0\n", env={})
    store = Store(str(tmp_path))
    dom = domain(nics)
    with in_netns(lab.ns):
        kernel = Kernel()
        try:
            kernel.bridge_for("br0") or kernel.by_name("br0")  # fdbhookd has seen the bridge before
            count = Counted(kernel)
            report = apply_domain(dom, config, kernel, store)
            assert [r.status for r in report.results] == ["changed"] * nics, report.one_line()
            assert count.trips <= 3 * nics + 1, count.trips  # + 1: the domain's first read, shared
            count.trips = 0
            again = apply_domain(dom, config, kernel, store)
            assert [r.status for r in again.results] == ["unchanged"] * nics
            assert count.trips == 1
            count.trips = 0
            teardown_domain("qemu", dom.name, kernel, store)
            assert count.trips <= 2 * nics + 1, count.trips  # no verify read at teardown
        finally:
            kernel.close()
    for i in range(nics):
        flags = lab.port_flags("vnet%d" % i)
        assert (flags["learning"], flags["flood"]) == (True, True)
    assert not [e for e in lab.fdb(br="br0") if e["state"] == "static"]


def test_batched_answers_decode_as_pyroute2_decodes_them(lab):
    """link_from_raw / entry_from_raw against pyroute2's own decoding, on real links and entries."""
    from fdbhook import kernel as K

    lab.add_bridge("br0")
    lab.add_veth("uplink", "wan", bridge="br0")
    lab.add_tap("vnet0", bridge="br0", mac="52:54:00:00:0c:01")
    lab.ip("link", "add", "lone0", "type", "veth", "peer", "name", "lone1")
    lab.bridge("link", "set", "dev", "vnet0", "learning", "off", "flood", "off", "locked", "on")
    lab.bridge("fdb", "replace", "52:54:00:00:0c:01", "dev", "vnet0", "master", "static", "sticky")
    with in_netns(lab.ns):
        kernel = Kernel()
        try:
            names = ["br0", "uplink", "wan", "vnet0", "lone0", "lone1"]
            raw = kernel._round_trip([K.msg_link_get(name=n) for n in names])
            for name, (msgs, code) in zip(names, raw):
                assert code == 0 and len(msgs) == 1, name
                theirs = kernel.ipr.link("get", ifname=name)[0]
                assert K.link_from_raw(msgs[0]) == (K.link_from_msg(theirs),
                                                    K._vlan_filtering(theirs) if name == "br0" else None), name
            br0 = kernel.by_name("br0").ifindex
            (msgs, code), = kernel._round_trip([K.msg_fdb_get("52:54:00:00:0c:01", br0)])
            theirs = [m for m in kernel.ipr.fdb("get", ifindex=0, lladdr="52:54:00:00:0c:01", master=br0)]
            assert code == 0 and K._master_entry_raw(msgs) == K._master_entry(theirs)
            assert K._master_entry_raw(msgs).sticky and K._master_entry_raw(msgs).static
            (msgs, code), = kernel._round_trip([K.msg_fdb_get("52:54:00:00:0c:99", br0)])
            assert code == 2 and msgs == []  # ENOENT
            assert kernel.links() == [K.link_from_msg(m) for m in kernel.ipr.get_links()]
        finally:
            kernel.close()


def test_a_port_dump_brings_only_that_port_entries(lab):
    """The ownership check's dump (``bridge fdb show dev PORT``) is filtered by the kernel, not in Python.

    Sent as a bare ndmsg, the kernel ignores the port and answers every entry
    of every bridge: with a big FDB on the uplink each guest start decoded
    all of them (100,000 entries: half a second). Counted in messages.
    """
    from fdbhook import kernel as K

    lab.add_bridge("br0")
    lab.add_veth("uplink", "wan", bridge="br0")
    lab.add_tap("vnet0", bridge="br0", mac="52:54:00:00:0d:01")
    subprocess.run(["bridge", "-n", lab.ns, "-batch", "-"], check=True, input="".join(
        "fdb add 02:aa:00:00:%02x:%02x dev uplink master static\n" % (i >> 8, i & 255) for i in range(500)).encode())
    lab.bridge("fdb", "add", "02:bb:00:00:00:01", "dev", "vnet0", "master", "static")
    with in_netns(lab.ns):
        kernel = Kernel()
        try:
            port = kernel.by_name("vnet0").ifindex
            (msgs, code), = kernel._round_trip([K.msg_fdb_dump(port)])
            assert code == 0 and len(msgs) < 20  # the port's own entries (and the tap's local/self ones) only
            assert [(e.mac, e.static) for e in kernel.port_entries(port) if e.mac == "02:bb:00:00:00:01"] == [
                ("02:bb:00:00:00:01", True)]
            assert not [e for e in kernel.port_entries(port) if e.mac.startswith("02:aa:")]
        finally:
            kernel.close()
