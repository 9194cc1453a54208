from fdbhook import domxml
from fdbhook.model import Link, Network
from fdbhook.policy import decide_domain
from fdbhook.resolve import DictLinks, load_networks
from tests.helpers import bridge_nic, config, domain_xml, network_nic

BR0 = Link(name="br0", ifindex=2, kind="bridge")
BR1 = Link(name="br1", ifindex=3, kind="bridge")
VIRBR = Link(name="virbr9", ifindex=4, kind="bridge")


def port(name, ifindex, master):
    return Link(name=name, ifindex=ifindex, kind="tun", master=master, is_bridge_port=True,
                learning=True, flood=True)


def decide(xml, links=(), cfg=None, networks=None, record=None):
    dom = domxml.parse_domain(xml)
    return decide_domain(dom, cfg or config(), networks or {}, DictLinks(links), record)


def test_bridge_nic_on_managed_bridge_is_managed():
    (d,) = decide(domain_xml([bridge_nic()]), [BR0, port("vnet0", 10, 2)])
    assert d.action == "manage", d.reason
    assert (d.port, d.ifindex, d.bridge, d.bridge_ifindex) == ("vnet0", 10, "br0", 2)
    assert "br0" in d.reason


def test_unmanaged_bridge_skipped_with_reason():
    (d,) = decide(domain_xml([bridge_nic(bridge="br1")]), [BR1, port("vnet0", 10, 3)])
    assert d.action == "skip" and "br1 not in [manage]" in d.reason


def test_no_config_manages_nothing():
    from fdbhook.config import Config
    (d,) = decide(domain_xml([bridge_nic()]), [BR0, port("vnet0", 10, 2)], cfg=Config())
    assert d.action == "skip" and "no config" in d.reason


def test_network_nic_bridge_from_live_xml():
    (d,) = decide(domain_xml([network_nic(bridge="virbr9")]), [VIRBR, port("vnet1", 11, 4)])
    assert d.action == "manage" and d.network == "isolated1" and d.bridge == "virbr9"


def test_network_nic_bridge_from_state_files(tmp_path):
    (tmp_path / "isolated1.xml").write_text(
        "<networkstatus><network><name>isolated1</name><bridge name='virbr9'/></network></networkstatus>")
    nets = load_networks(["isolated1", "../etc/passwd", None], [str(tmp_path / "missing"), str(tmp_path)])
    assert nets == {"isolated1": Network(name="isolated1", bridge="virbr9")}
    (d,) = decide(domain_xml([network_nic()]), [VIRBR, port("vnet1", 11, 4)], networks=nets)
    assert d.action == "manage" and d.bridge == "virbr9"


def test_network_unknown_bridge_is_error_when_managed():
    (d,) = decide(domain_xml([network_nic(dev=None)]))
    assert d.action == "error" and "bridge unknown" in d.reason


def test_libvirt_mac_table_manager_is_left_to_libvirt():
    (d,) = decide(domain_xml([network_nic(bridge="virbr9", mtm="libvirt")]), [VIRBR, port("vnet1", 11, 4)])
    assert d.action == "skip" and "macTableManager='libvirt'" in d.reason
    nets = {"isolated1": Network(name="isolated1", bridge="virbr9", mac_table_manager="libvirt")}
    (d,) = decide(domain_xml([network_nic()]), [VIRBR, port("vnet1", 11, 4)], networks=nets)
    assert d.action == "skip" and "libvirt" in d.reason


def test_kernel_master_mismatch_is_reported_not_followed():
    (d,) = decide(domain_xml([bridge_nic(bridge="br0")]), [BR0, BR1, port("vnet0", 10, 3)],
                  cfg=config("[manage]\nbridges = br*\n"))
    assert d.action == "error" and "on bridge br1 but the XML says br0" in d.reason


def test_missing_port_and_missing_target():
    (d,) = decide(domain_xml([bridge_nic()]), [BR0])
    assert d.action == "error" and "vnet0 does not exist" in d.reason
    (d,) = decide(domain_xml([bridge_nic(dev=None)]), [BR0])
    assert d.action == "error" and "no <target dev>" in d.reason


def test_port_not_on_bridge():
    (d,) = decide(domain_xml([bridge_nic()]), [BR0, Link(name="vnet0", ifindex=10, kind="tun")])
    assert d.action == "error" and "not on any bridge" in d.reason


def test_bad_macs_refused():
    for mac in ("01:00:5e:00:00:01", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"):
        (d,) = decide(domain_xml([bridge_nic(mac=mac)]), [BR0, port("vnet0", 10, 2)])
        assert d.action == "error" and "refused" in d.reason, mac
    (d,) = decide(domain_xml([bridge_nic(mac="zz:54")]), [BR0, port("vnet0", 10, 2)])
    assert d.action == "error" and "not a MAC" in d.reason


def test_opt_outs():
    meta = "<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1' mode='off'/></metadata>"
    (d,) = decide(domain_xml([bridge_nic()], metadata=meta), [BR0, port("vnet0", 10, 2)])
    assert d.action == "skip" and "domain opted out" in d.reason
    meta = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'><fdb:interface mac='52:54:00:00:00:01' mode='off'/>"
            "</fdb:fdb></metadata>")
    d1, d2 = decide(domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:09", dev="vnet9")], metadata=meta),
                    [BR0, port("vnet0", 10, 2), port("vnet9", 19, 2)])
    assert d1.action == "skip" and "NIC opted out" in d1.reason
    assert d2.action == "manage"


def test_ethernet_tap_counts_only_on_managed_bridge():
    eth = "<interface type='ethernet'><mac address='52:54:00:00:00:05'/><target dev='tap5'/></interface>"
    (d,) = decide(domain_xml([eth]), [BR0, port("tap5", 15, 2)])
    assert d.action == "manage" and d.bridge == "br0"
    (d,) = decide(domain_xml([eth]), [BR0, Link(name="tap5", ifindex=15, kind="tun")])
    assert d.action == "skip" and "on no bridge" in d.reason


def test_other_types_skipped_with_reason():
    nics = ["<interface type='direct'><mac address='52:54:00:00:00:06'/><source dev='eth0' mode='vepa'/></interface>",
            "<interface type='hostdev'><mac address='52:54:00:00:00:07'/></interface>",
            "<interface type='vhostuser'><mac address='52:54:00:00:00:08'/></interface>",
            "<interface type='user'/>", "<interface/>", "<interface type='weird'/>"]
    for d in decide(domain_xml(nics)):
        assert d.action == "skip" and d.reason


def test_ovs_bridge_is_not_ours():
    ovs = Link(name="ovs-system", ifindex=5, kind="openvswitch")
    (d,) = decide(domain_xml([bridge_nic(bridge="br0")]), [ovs, port("vnet0", 10, 5)],
                  cfg=config("[manage]\nbridges = *\n"))
    assert d.action in ("error", "skip")
    assert "ovs-system" in d.reason or "br0" in d.reason


def test_lxc_port_is_the_veth_peer():
    xml = domain_xml(["<interface type='bridge'><mac address='52:54:00:00:00:0c'/><source bridge='br0'/>"
                      "<guest dev='eth0' actual='vnet12'/></interface>"], dtype="lxc")
    inner = Link(name="vnet12", ifindex=21, kind="veth", peer=20)
    host = Link(name="vnet11", ifindex=20, kind="veth", peer=21, master=2, is_bridge_port=True,
                learning=True, flood=True)
    (d,) = decide(xml, [BR0, inner, host])
    assert d.action == "manage" and d.port == "vnet11" and d.ifindex == 20


def test_lxc_after_move_uses_record():
    from fdbhook.model import DomainRecord, NicRecord
    xml = domain_xml(["<interface type='bridge'><mac address='52:54:00:00:00:0c'/><source bridge='br0'/>"
                      "<guest dev='eth0' actual='vnet12'/></interface>"], dtype="lxc")
    host = Link(name="vnet11", ifindex=20, kind="veth", master=2, is_bridge_port=True)
    rec = DomainRecord(driver="lxc", domain="t1", nics=(NicRecord(mac="52:54:00:00:00:0c", port="vnet11",
                                                                  ifindex=20, bridge="br0"),))
    (d,) = decide(xml, [BR0, host], record=rec)
    assert d.action == "manage" and d.port == "vnet11"
    (d,) = decide(xml, [BR0, host])
    assert d.action == "error" and "actual='vnet12'" in d.reason
