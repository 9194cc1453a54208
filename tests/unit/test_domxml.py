import io

import pytest

from fdbhook import domxml
from fdbhook.errors import InvalidDomainXML
from tests.helpers import bridge_nic, domain_xml, network_nic


def test_parse_bridge_and_network_nics():
    dom = domxml.parse_domain(domain_xml([bridge_nic(), network_nic(bridge="virbr9")]))
    assert dom.name == "t1" and dom.driver == "qemu" and dom.mode == "on"
    br, net = dom.nics
    assert (br.type, br.mac, br.source_bridge, br.target_dev, br.alias) == (
        "bridge", "52:54:00:00:00:01", "br0", "vnet0", "net0")
    assert (net.type, net.source_network, net.source_bridge) == ("network", "isolated1", "virbr9")


def test_mac_is_normalised_and_lxc_guest_read():
    xml = domain_xml(["<interface type='network'><mac address='52:54:00:AB:CD:EF'/><source network='n'/>"
                      "<guest dev='eth0' actual='vnet12'/></interface>"], dtype="lxc")
    dom = domxml.parse_domain(xml)
    assert dom.driver == "lxc"
    assert dom.nics[0].mac == "52:54:00:ab:cd:ef"
    assert (dom.nics[0].guest_dev, dom.nics[0].guest_actual) == ("eth0", "vnet12")


def test_metadata_opt_outs_and_vlans():
    meta = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1' mode='on'>"
            "<fdb:interface mac='52:54:00:00:00:01' mode='off'/>"
            "<fdb:interface mac='52:54:00:00:00:02' vlan='42' trunk='100-102,7'/>"
            "</fdb:fdb></metadata>")
    dom = domxml.parse_domain(domain_xml([bridge_nic(), network_nic()], metadata=meta))
    assert dom.nics[0].mode == "off"
    assert dom.nics[1].vlan == 42 and dom.nics[1].trunk == (7, 100, 101, 102)
    off = domxml.parse_domain(domain_xml([bridge_nic()], metadata=(
        "<metadata><x:fdb xmlns:x='urn:x-fdbhook:1' mode='off'/></metadata>")))
    assert off.mode == "off"


@pytest.mark.parametrize("spec", ["0", "4095", "10-5", "abc", "1,2"])
def test_bad_vlan_spec_refused(spec):
    meta = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'><fdb:interface mac='52:54:00:00:00:01' vlan='%s'/>"
            "</fdb:fdb></metadata>" % spec)
    with pytest.raises(InvalidDomainXML, match="t1.*VLAN"):
        domxml.parse_domain(domain_xml([bridge_nic()], metadata=meta))


def test_bad_metadata_mode_refused():
    meta = "<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1' mode='maybe'/></metadata>"
    with pytest.raises(InvalidDomainXML, match="mode"):
        domxml.parse_domain(domain_xml([bridge_nic()], metadata=meta))


HOSTILE = {
    "xxe": b"<?xml version='1.0'?><!DOCTYPE d [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>"
           b"<domain><name>&x;</name></domain>",
    "billion_laughs": b"<?xml version='1.0'?><!DOCTYPE l [<!ENTITY a 'aaaaaaaaaa'>"
                      b"<!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'><!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;'>]>"
                      b"<domain><name>&c;</name></domain>",
    "truncated": b"<domain type='kvm'><name>t1</name><devices><interface type='bridge'>",
    "garbage": b"\x00\xff\xfe not xml at all",
    "empty": b"",
    "wrong_root": b"<network><name>n</name></network>",
    "no_name": b"<domain type='kvm'><devices/></domain>",
    "xinclude": b"<domain xmlns:xi='http://www.w3.org/2001/XInclude'><name>t</name>"
                b"<xi:include href='file:///etc/passwd' parse='text'/></domain>",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_gives_one_line_error(name):
    data = HOSTILE[name]
    if name == "xinclude":
        # XInclude is never processed: the element is just an unknown child.
        assert domxml.parse_domain(data).name == "t"
        return
    with pytest.raises(InvalidDomainXML) as info:
        domxml.parse_domain(data, what="evil")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("domain evil: invalid XML:")


def test_hundred_megabyte_document_is_refused_after_one_bounded_read():
    from fdbhook.client import MAX_STDIN, read_stdin

    data = read_stdin(io.BytesIO(b"<domain>" + b" " * (100 * 1024 * 1024)))
    assert len(data) == MAX_STDIN
    with pytest.raises(InvalidDomainXML, match="larger than"):
        domxml.parse_document(data, what="big")
    with pytest.raises(InvalidDomainXML, match="larger than"):
        domxml.parse_document(b"<domain>" + b" " * (100 * 1024 * 1024) + b"</domain>")


@pytest.mark.parametrize("mac,problem", [
    ("52:54:00:00:00:01", None),
    ("00:00:00:00:00:00", "all-zero"),
    ("ff:ff:ff:ff:ff:ff", "multicast"),
    ("01:00:5e:00:00:01", "multicast"),
    ("33:33:00:00:00:01", "multicast"),
])
def test_mac_problem(mac, problem):
    got = domxml.mac_problem(mac)
    assert (got is None) if problem is None else (problem in got)


def test_parse_network_status_and_config():
    status = b"<networkstatus><class_id bitmap='0-2'/><network><name>n1</name>" \
             b"<bridge name='virbr7' macTableManager='libvirt'/></network></networkstatus>"
    net = domxml.parse_network(status)
    assert (net.name, net.bridge, net.mac_table_manager) == ("n1", "virbr7", "libvirt")
    hook = b"<hookData><network><name>n2</name><forward mode='bridge'/><bridge name='br0'/></network></hookData>"
    net = domxml.parse_network(hook)
    assert (net.name, net.bridge, net.forward_mode) == ("n2", "br0", "bridge")
