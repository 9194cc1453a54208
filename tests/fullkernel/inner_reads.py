"""Runs INSIDE Debian's full kernel under virtme-ng (see test_fullkernel.py): the adapter's reads on
VLAN-filtering bridges (issue 20).

* ``Kernel.port_vlans`` (one port's RTM_GETVLAN dump, decoded from the
  bytes) against pyroute2's decoding of the old AF_BRIDGE link dump and
  against ``bridge -j vlan show``: ranges, PVID inside a range, untagged;
* the engine's netlink round trips per NIC on a VLAN-filtering bridge,
  counted as tests/kernel/test_batching_kernel.py counts them without
  filtering: at most 3 per NIC plus 2 per domain, 1 for a domain that is
  already right; no VXLAN-port dump while no vxlan driver is loaded.
"""

import os

import pytest

from fdbhook import domxml
from fdbhook import kernel as K
from fdbhook.config import parse_config
from fdbhook.engine import apply_domain, teardown_domain
from fdbhook.kernel import Kernel
from fdbhook.lab import Lab, in_netns
from fdbhook.state import Store

pytestmark = pytest.mark.skipif(
    "virtme" not in open("/proc/cmdline").read() and os.environ.get("FDBHOOK_FULLKERNEL_FORCE") != "1",
    reason="only inside the virtme-ng guest kernel (tests/fullkernel/test_fullkernel.py runs it)")


@pytest.fixture(scope="module", autouse=True)
def modules():
    import subprocess
    subprocess.run(["modprobe", "-a", "bridge", "tun"], check=True)


def iproute2_vlans(lab, dev):
    """``bridge -j vlan show dev DEV`` as ((vid, pvid, untagged), ...), ranges expanded."""
    out = lab.json("vlan", "show", "dev", dev, tool="bridge")
    got = []
    for v in (out[0]["vlans"] if out else []):
        flags = v.get("flags", [])
        for vid in range(v["vlan"], v.get("vlanEnd", v["vlan"]) + 1):
            got.append((vid, "PVID" in flags and vid == v["vlan"], "Egress Untagged" in flags))
    return tuple(sorted(got))


def test_port_vlans_decode_as_pyroute2_and_iproute2_read_them():
    with Lab(prefix="fdbfull") as lab:
        lab.add_bridge("br0")
        lab.ip("link", "set", "br0", "type", "bridge", "vlan_filtering", "1")
        for name in ("vnet0", "vnet1", "vnet2", "vnet3"):
            lab.add_tap(name, bridge="br0")
        lab.bridge("vlan", "add", "vid", "10-13", "dev", "vnet1")  # a range ...
        lab.bridge("vlan", "add", "vid", "11", "dev", "vnet1", "pvid", "untagged")  # ... the PVID inside it
        lab.bridge("vlan", "add", "vid", "100", "dev", "vnet1")
        lab.bridge("vlan", "add", "vid", "200-203", "dev", "vnet1", "untagged")
        lab.bridge("vlan", "del", "vid", "1", "dev", "vnet2")  # no VLAN at all
        lab.bridge("vlan", "add", "vid", "2-200", "dev", "vnet3")  # one long range
        with in_netns(lab.ns):
            kernel = Kernel()
            try:
                for name in ("vnet0", "vnet1", "vnet2", "vnet3"):
                    ifindex = kernel.by_name(name).ifindex
                    ours = kernel.port_vlans(ifindex)
                    assert ours == kernel._port_vlans_from_link_dump(ifindex) == iproute2_vlans(lab, name), name
                    if name == "vnet1":
                        assert ours == ((1, False, True), (10, False, False), (11, True, True), (12, False, False),
                                        (13, False, False), (100, False, False), (200, False, True),
                                        (201, False, True), (202, False, True), (203, False, True))
                    if name == "vnet3":
                        assert len(ours) == 200
                assert kernel.port_vlans(987654) == ()  # no such device
            finally:
                kernel.close()


def domain(n):
    """N NICs on br0: even ones plain (the port's VLANs as they are), odd ones with an access VLAN and a trunk."""
    nics = []
    for i in range(n):
        meta = ("<fdb:interface mac='52:54:00:00:0d:%02x' vlan='42' trunk='100-101'/>" % (i + 1)) if i % 2 else ""
        nics.append((meta, "<interface type='bridge'><mac address='52:54:00:00:0d:%02x'/><source bridge='br0'/>"
                           "<target dev='vnet%d'/><alias name='net%d'/></interface>" % (i + 1, i, i)))
    metadata = "".join(m for m, _ in nics)
    return domxml.parse_domain((
        "<domain type='kvm'><name>rt%d</name><metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>%s</fdb:fdb>"
        "</metadata><devices>%s</devices></domain>" % (n, metadata, "".join(x for _, x in nics))).encode())


class Counted:
    """Counts the adapter's round trips (as tests/kernel/test_batching_kernel.py) and keeps its requests."""

    def __init__(self, kernel):
        self.trips, self.requests, self.asked = 0, [], []
        ipr = kernel.ipr
        plain, batch = ipr.nlm_request, kernel._round_trip

        def one(*args, **kw):
            self.trips += 1
            return plain(*args, **kw)

        def many(requests):
            self.trips += 1
            self.requests.extend(requests)
            self.asked.append([(r[4], r[16:]) for r in requests])  # type and body: what each trip asked
            return batch(requests)

        ipr.nlm_request = one
        kernel._round_trip = many


@pytest.mark.parametrize("nics", [1, 4])
def test_round_trips_per_nic_on_a_vlan_filtering_bridge(tmp_path, nics):
    with Lab(prefix="fdbfull") as lab:
        lab.add_bridge("br0")
        lab.ip("link", "set", "br0", "type", "bridge", "vlan_filtering", "1")
        for i in range(nics):
            lab.add_tap("vnet%d" % i, bridge="br0")
            # as libvirt makes its taps: the NIC's MAC with the first byte 0xfe (policy: ours at once)
            lab.ip("link", "set", "vnet%d" % i, "address", "fe:54:00:00:0d:%02x" % (i + 1))
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
                print("round trips, %d NICs, VLAN filtering: apply %d" % (nics, count.trips))
                assert count.trips <= 3 * nics + 2, (count.trips, [[t for t, _ in trip] for trip in count.asked])  # + 2: the domain's first read and its VLANs
                if not K.vxlan_driver_loaded():  # no VXLAN-port dump (it would list every port)
                    assert K.msg_vxlan_ports(kernel.bridge_for("br0")) not in count.requests
                count.trips, count.asked = 0, []
                again = apply_domain(dom, config, kernel, store)
                assert [r.status for r in again.results] == ["unchanged"] * nics
                assert count.trips == 1, count.asked
                count.trips = 0
                teardown_domain("qemu", dom.name, kernel, store)
                assert count.trips <= 2 * nics + 1, count.trips
            finally:
                kernel.close()
        for i in range(nics):
            flags = lab.port_flags("vnet%d" % i)
            assert (flags["learning"], flags["flood"]) == (True, True)
            assert iproute2_vlans(lab, "vnet%d" % i) == ((1, True, True),)  # VLANs back as they were
        assert not [e for e in lab.fdb(br="br0") if e["state"] == "static"]
