"""Hook inputs captured from a real libvirtd 9.0 (tests/fixtures/libvirt)."""

import json
import os

import pytest

from fdbhook import domxml
from fdbhook.model import Link
from fdbhook.policy import decide_domain
from fdbhook.resolve import DictLinks
from tests.helpers import config

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "libvirt")
CFG = config("[manage]\nbridges = br-fix0\nnetworks = fixnet\n", FDBHOOK_LIBVIRT_NETWORK_DIRS=FIX)


def fixture(name):
    with open(os.path.join(FIX, name), "rb") as handle:
        return handle.read()


def links_from_ip_json(name):
    """Links as `ip -d -j link` showed them while the hook ran."""
    raw = json.loads(fixture(name))
    index = {link["ifname"]: link["ifindex"] for link in raw}
    out = []
    for link in raw:
        info = link.get("linkinfo", {})
        slave = info.get("info_slave_data", {}) if info.get("info_slave_kind") == "bridge" else {}
        out.append(Link(name=link["ifname"], ifindex=link["ifindex"], kind=info.get("info_kind"),
                        master=index.get(link.get("master")),
                        # iproute2 names a same-namespace veth peer in "link"
                        peer=None if "link_netnsid" in link else index.get(link.get("link")),
                        mac=link.get("address"), is_bridge_port=bool(slave),
                        learning=slave.get("learning"), flood=slave.get("flood")))
    return DictLinks(out)


def decisions(xml_name, links_name, driver):
    dom = domxml.parse_domain(fixture(xml_name), driver=driver)
    # libvirt's /run/libvirt/network/fixnet.xml, as captured
    status = domxml.parse_network(fixture("runstate-fixnet.xml"))
    nets = {status.name: status}
    return dom, {d.nic.mac: d for d in decide_domain(dom, CFG, nets, links_from_ip_json(links_name))}


def test_every_fixture_parses():
    names = [n for n in os.listdir(FIX) if n.endswith(".xml")]
    assert len(names) > 40
    for name in names:
        root = domxml.parse_document(fixture(name), what=name)
        if root.tag == "domain":
            dom = domxml.domain_from_element(root)
            assert dom.name
        else:
            assert root.tag in ("hookData", "networkstatus", "network", "networkport", "domstatus", "interface"), name


@pytest.mark.parametrize("op", ["start", "started"])
def test_qemu_start_resolves_every_nic(op):
    dom, by_mac = decisions("qemu-fix1-%s-begin.xml" % op, "links-after-start-fix1.json", "qemu")
    assert dom.name == "fix1"
    br, net, eth, direct = (by_mac["52:54:00:f1:00:0%d" % i] for i in range(1, 5))
    assert (br.action, br.port, br.bridge) == ("manage", "vnet0", "br-fix0"), br.reason
    # the capture's metadata opts this NIC out; it is still fully resolved
    assert (net.action, net.port, net.bridge, net.network) == ("skip", "vnet1", "virbr-fix", "fixnet")
    assert "NIC opted out" in net.reason
    assert eth.action == "skip" and "on no bridge" in eth.reason
    assert direct.action == "skip" and "macvtap" in direct.reason


def test_qemu_metadata_survives_libvirt_round_trip():
    dom = domxml.parse_domain(fixture("qemu-fix1-start-begin.xml"))
    assert dom.mode == "on"
    assert [n.mode for n in dom.nics].count("off") == 1


def test_qemu_stopped_xml_names_no_port():
    dom = domxml.parse_domain(fixture("qemu-fix1-stopped-end.xml"))
    bridged = [n for n in dom.nics if n.type in ("bridge", "network")]
    assert bridged and all(n.target_dev is None for n in bridged)


def test_lxc_start_finds_host_port_through_veth_peer():
    dom, by_mac = decisions("lxc-ct1-start-begin.xml", "lxc-ct1-start-begin.links.json", "lxc")
    assert dom.driver == "lxc"
    for mac, d in by_mac.items():
        assert d.action == "manage", (mac, d.reason)
        assert d.port.startswith("vnet") and d.bridge in ("virbr-fix", "br-fix0")
    guest = {n.mac: n.guest_actual for n in dom.nics}
    assert all(by_mac[mac].port != actual for mac, actual in guest.items())


def test_lxc_started_uses_target_dev():
    dom, by_mac = decisions("lxc-ct1-started-begin.xml", "lxc-ct1-started-begin.links.json", "lxc")
    for d in by_mac.values():
        assert d.action == "manage", d.reason


def test_network_hook_inputs():
    net = domxml.parse_network(fixture("network-fixnet-started-begin.xml"))
    assert (net.name, net.bridge) == ("fixnet", "virbr-fix")
    mtm = domxml.parse_network(fixture("network-fixmtm-start-begin.xml"))
    assert mtm.mac_table_manager == "libvirt"
