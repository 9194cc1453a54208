import pytest

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


def test_status_of_a_vlan_filtering_bridge_is_the_records_plan(tmp_path):
    """Healthy per-VLAN entries are healthy; a missing one is drift (the old VID-0-only check said drift)."""
    from fdbhook import domxml
    from fdbhook.engine import apply_domain
    from fdbhook.state import Store
    from fdbhook.status import collect
    from tests.fakes import FakeKernel
    from tests.helpers import bridge_nic, config, domain_xml

    k = FakeKernel.bridge_with_ports("br0", ("vnet0", "eth0"))
    k.filtering[10] = True
    k.vlans[11] = {42: (True, True), 100: (False, False)}
    store, cfg = Store(str(tmp_path)), config()
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), cfg, k, store)
    assert sorted(key[2] for key in k.entries) == [42, 100]
    data = collect(cfg, k, store)
    port = next(p for p in data["bridges"][0]["ports"] if p["name"] == "vnet0")
    assert (port["drift"], port["static_entry"], data["drift"]) == ([], True, False)
    del k.entries[(10, "52:54:00:00:00:01", 100)]
    data = collect(cfg, k, store)
    port = next(p for p in data["bridges"][0]["ports"] if p["name"] == "vnet0")
    assert port["drift"] == ["static entry for 52:54:00:00:00:01 on VLAN 100 missing"] and data["drift"]


def test_status_says_when_fdbhookd_cannot_watch_for_first_frames(tmp_path):
    from fdbhook.state import Store
    from fdbhook.status import collect, render_text
    from tests.fakes import FakeKernel
    from tests.helpers import config

    data = collect(config(), FakeKernel.bridge_with_ports("br0", ("vnet0",)), Store(str(tmp_path)))
    data["daemon"].update(answering=True, first_frames_unavailable="AF_PACKET socket: Operation not permitted")
    assert "incoming migrations get their entries at RESUMED, not at the guest's first frame: AF_PACKET socket: " \
           "Operation not permitted" in render_text(data)
    data["daemon"]["first_frames_unavailable"] = ""
    assert "first frame" not in render_text(data)


def test_the_packet_socket_probe_as_root_and_without_cap_net_raw():
    import os
    import subprocess
    import sys

    from fdbhook.kernel import FrameSocket

    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert FrameSocket.unavailable() == ""
    # without CAP_NET_RAW (setpriv drops it from every set): the reason, not an exception
    code = "from fdbhook.kernel import FrameSocket; print(FrameSocket.unavailable())"
    out = subprocess.run(["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw", sys.executable, "-c", code],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("AF_PACKET socket: ") and "CAP_NET_RAW" in out.stdout


def test_an_incoming_guests_port_says_where_its_entry_comes_from():
    from fdbhook.status import _entry_word

    port = {"domain": "qemu/a", "paused": True, "static_entry": None}
    assert _entry_word(port) == "  entry removed (guest paused)"
    assert _entry_word(dict(port, incoming="first frame")) == \
        "  no entry yet (incoming migration: it goes in at the guest's first frame)"
