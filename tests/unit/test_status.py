from fdbhook.status import explain_bridge


def bridge(**kw):
    base = {"name": "br0", "promiscuity": 0, "vlan_filtering": True, "vlan_filtering_supported": True,
            "ports": [{"name": "bond0", "kind": "bond", "domain": None}], "auto_ports": ["bond0"]}
    base.update(kw)
    return base


def test_clearable():
    assert explain_bridge(bridge()) == ["the kernel can keep the uplink out of promiscuous mode"]


def test_each_reason_in_plain_words():
    text = " ".join(explain_bridge(bridge(vlan_filtering=False)))
    assert "vlan_filtering is off on br0" in text
    text = " ".join(explain_bridge(bridge(vlan_filtering_supported=False)))
    assert "no bridge VLAN filtering" in text
    text = " ".join(explain_bridge(bridge(promiscuity=1)))
    assert "bridge device br0 is itself promiscuous" in text
    ports = [{"name": "bond0", "kind": "bond", "domain": None}, {"name": "vnet3", "kind": "tun", "domain": "qemu/a"}]
    text = " ".join(explain_bridge(bridge(ports=ports, auto_ports=["bond0", "vnet3"])))
    assert "2 ports still learn or flood (bond0, vnet3)" in text
    ports = [{"name": "veth0", "kind": "veth", "domain": None}]
    text = " ".join(explain_bridge(bridge(ports=ports, auto_ports=["veth0"])))
    assert "veth0 is a veth device, which has no unicast filter" in text
