"""Whose NIC a port that joined a bridge is, from its kind, its MAC and its veth peer's MAC (fdbhook.joined)."""

from fdbhook import domxml
from fdbhook.joined import JoinedPort, match_joined
from fdbhook.model import libvirt_tap_mac as tap_mac
from tests.helpers import bridge_nic, domain_xml, network_nic

QEMU = domxml.parse_domain(domain_xml([bridge_nic(dev=None), network_nic(dev=None)], name="web1"), driver="qemu")
LXC = domxml.parse_domain(domain_xml([bridge_nic(mac="52:54:00:00:00:07", dev=None)], name="ct1"), driver="lxc")


def tap(mac, name="vnet7", bridge="br0", kind="tun"):
    return JoinedPort(name=name, kind=kind, mac=mac, bridge=bridge)


def test_libvirt_addresses_a_qemu_tap_from_the_nic_mac_with_first_byte_fe():
    assert tap_mac("52:54:00:00:00:01") == "fe:54:00:00:00:01"


def test_a_qemu_tap_carrying_a_known_nic_mac_gets_that_nic_and_only_it():
    match = match_joined(tap("fe:54:00:00:00:01"), [QEMU, LXC])
    assert match.domain.name == "web1" and match.domain.driver == "qemu"
    assert [n.mac for n in match.domain.nics] == ["52:54:00:00:00:01"]
    assert match.nic.target_dev == "vnet7"
    # A network NIC (bridge unknown before start) matches on any bridge; the engine checks the network's.
    assert match_joined(tap("fe:54:00:00:00:02", bridge="virbr-x"), [QEMU]).nic.source_network == "isolated1"


def test_ports_nothing_vouches_for_are_not_matched():
    assert match_joined(tap("52:54:00:00:00:01"), [QEMU]) is None  # the guest's own MAC: not a libvirt tap
    assert match_joined(tap("fe:54:00:00:00:99"), [QEMU]) is None  # a MAC no known NIC has
    assert match_joined(tap("fe:54:00:00:00:01", bridge="br1"), [QEMU]) is None  # the NIC names another bridge
    assert match_joined(tap("fe:54:00:00:00:01", kind="veth"), [QEMU]) is None  # qemu NICs get taps
    assert match_joined(tap("fe:54:00:00:00:01", kind=None), [QEMU]) is None  # an uplink, a bond...
    assert match_joined(tap(None), [QEMU]) is None
    assert match_joined(tap("fe:54:00:00:00:01"), []) is None


def test_a_port_is_taken_only_under_the_name_the_xml_gives_or_else_a_name_libvirt_gives():
    assert match_joined(tap("fe:54:00:00:00:01", name="admtap0"), [QEMU]) is None  # libvirt would say vnetN
    named = domxml.parse_domain(domain_xml([bridge_nic(dev="web1-eth0")], name="web1"), driver="qemu")
    assert match_joined(tap("fe:54:00:00:00:01", name="web1-eth0"), [named]).nic.target_dev == "web1-eth0"


def test_a_nic_whose_xml_names_another_device_is_not_taken():
    live = domxml.parse_domain(domain_xml([bridge_nic(dev="vnet3")], name="web1"), driver="qemu")
    assert match_joined(tap("fe:54:00:00:00:01", name="vnet9"), [live]) is None
    assert match_joined(tap("fe:54:00:00:00:01", name="vnet3"), [live]).nic.target_dev == "vnet3"


def test_two_known_nics_that_differ_only_in_the_first_byte_are_not_guessed_between():
    other = domxml.parse_domain(domain_xml([bridge_nic(mac="02:54:00:00:00:01", dev=None)], name="web2"),
                                driver="qemu")
    assert match_joined(tap("fe:54:00:00:00:01"), [QEMU, other]) is None


def test_an_lxc_host_veth_is_matched_by_its_peer_which_carries_the_nic_mac():
    port = JoinedPort(name="vnet4", kind="veth", mac="6a:11:22:33:44:55", bridge="br0", peer_mac="52:54:00:00:00:07")
    match = match_joined(port, [QEMU, LXC])
    assert match.domain.name == "ct1" and match.nic.target_dev == "vnet4"
    assert match_joined(JoinedPort("vnet4", "veth", "6a:11:22:33:44:55", "br0"), [LXC]) is None  # no peer seen
    assert match_joined(JoinedPort("vnet4", "tun", "fe:54:00:00:00:07", "br0"), [LXC]) is None  # lxc NICs get veths
