"""A MAC the guest set itself (currentAddress) that another NIC holds: never taken, never fatal."""

from fdbhook import domxml
from fdbhook.engine import apply_domain
from fdbhook.state import Store
from tests.fakes import FakeKernel
from tests.helpers import config, domain_xml

MAC0, MAC1 = "52:54:00:00:00:01", "52:54:00:00:00:02"


def nic(mac, dev, alias, current=None):
    cur = " currentAddress='%s'" % current if current else ""
    return ("<interface type='bridge' trustGuestRxFilters='yes'><mac address='%s'%s/><source bridge='br0'/>"
            "<target dev='%s'/><alias name='%s'/></interface>" % (mac, cur, dev, alias))


def make_lab(tmp_path):
    k = FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1", "vnet2", "eth0"))
    store, cfg = Store(str(tmp_path)), config()
    apply_domain(domxml.parse_domain(domain_xml([nic(MAC0, "vnet0", "net0"), nic(MAC1, "vnet1", "net1")])),
                 cfg, k, store)
    return k, store, cfg


def test_guest_taking_its_other_nics_mac_keeps_the_configured_one(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    # net0's guest set net1's MAC; net0 comes first in the XML, net1 still owns it.
    xml = domain_xml([nic(MAC0, "vnet0", "net0", current=MAC1), nic(MAC1, "vnet1", "net1")])
    report = apply_domain(domxml.parse_domain(xml), cfg, k, store)
    assert not report.failures, report.one_line()  # a reconnect hook exits 0: libvirt keeps the guest
    assert k.fdb_get(MAC1, k.by_name("br0").ifindex).ifindex == k.by_name("vnet1").ifindex
    assert k.fdb_get(MAC0, k.by_name("br0").ifindex).ifindex == k.by_name("vnet0").ifindex
    assert sorted((n.port, n.mac, n.config_mac) for n in store.load("qemu", "t1").nics) == [
        ("vnet0", MAC0, None), ("vnet1", MAC1, None)]


def test_guest_taking_another_domains_mac_keeps_the_configured_one(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    other = domain_xml([nic("52:54:00:00:00:09", "vnet2", "net0", current=MAC1)], name="t2")
    report = apply_domain(domxml.parse_domain(other), cfg, k, store)
    assert not report.failures, report.one_line()
    assert k.fdb_get(MAC1, k.by_name("br0").ifindex).ifindex == k.by_name("vnet1").ifindex
    assert k.fdb_get("52:54:00:00:00:09", k.by_name("br0").ifindex).ifindex == k.by_name("vnet2").ifindex


def test_one_nic_reconciled_alone_still_leaves_the_owners_entry(tmp_path):
    # fdbhookd's NIC_MAC_CHANGE job applies only that NIC: the bridge's entry for net1 is what says no.
    k, store, cfg = make_lab(tmp_path)
    dom = domxml.parse_domain(domain_xml([nic(MAC0, "vnet0", "net0", current=MAC1)]))
    report = apply_domain(dom, cfg, k, store, prune=False)
    assert not report.failures, report.one_line()
    assert k.fdb_get(MAC1, k.by_name("br0").ifindex).ifindex == k.by_name("vnet1").ifindex


def test_a_configured_duplicate_is_still_an_error(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    xml = domain_xml([nic(MAC1, "vnet0", "net0"), nic(MAC1, "vnet1", "net1")])
    report = apply_domain(domxml.parse_domain(xml), cfg, k, store)
    assert [r.failed for r in report.results] == [False, True]
