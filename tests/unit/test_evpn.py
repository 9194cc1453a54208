"""EVPN without root: the sticky rule, taking over a remote EVPN MAC, FRR's JSON, status over a fake kernel."""

import os
import subprocess

import pytest

from fdbhook import domxml, evpn
from fdbhook.engine import apply_domain, reapply_record
from fdbhook.errors import ConfigError
from fdbhook.model import FdbEntry, Link
from fdbhook.plan import entry_conflict
from fdbhook.state import Store
from fdbhook.status import collect, render_explain, render_text
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, config, domain_xml

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "frr")
MAC = "52:54:00:00:00:01"


def fixture(name):
    with open(os.path.join(FIXTURES, name)) as fh:
        return fh.read()


def with_vxlan(kernel, name="vxlan100", ifindex=30, master=10):
    kernel.links_by_index[ifindex] = Link(name=name, ifindex=ifindex, kind="vxlan", master=master,
                                          is_bridge_port=True, learning=False, flood=True, locked=False, mab=False)
    return kernel


# --- the sticky rule -----------------------------------------------------------------------

def test_sticky_auto_is_the_default_and_off_only_where_the_bridge_has_a_vxlan_port():
    cfg = config()
    assert cfg.sticky == "auto"
    on, why = cfg.sticky_for("br0", None, ())
    assert on and "no VXLAN port" in why
    off, why = cfg.sticky_for("br0", None, ("vxlan100",))
    assert not off and "br0 has VXLAN port vxlan100" in why and "EVPN" in why


def test_sticky_yes_no_and_the_most_specific_section_wins():
    cfg = config("[manage]\nbridges = br0 br1\nsticky = yes\n[bridge br1]\nsticky = auto\n"
                 "[network lan]\nsticky = off\n")
    assert cfg.sticky_for("br0", None, ("vxlan100",)) == (True, "sticky = yes in [manage]")
    assert cfg.sticky_for("br1", None, ("vxlan7",))[0] is False
    assert "[bridge br1]" in cfg.sticky_for("br1", None, ("vxlan7",))[1]
    assert cfg.sticky_for("br1", "lan", ()) == (False, "sticky = no in [network lan]")


@pytest.mark.parametrize("text", ["[manage]\nsticky = sometimes\n", "[bridge br0]\nsticky = 2\n"])
def test_sticky_bad_value_is_a_config_error(text):
    with pytest.raises(ConfigError, match="neither a boolean nor auto"):
        config(text)


def test_apply_on_a_bridge_with_a_vxlan_port_adds_entries_without_sticky(tmp_path):
    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0",)))
    report = apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, Store(str(tmp_path)))
    assert not report.failures
    entry = k.entries[(10, MAC, 0)]
    assert entry.ifindex == 11 and entry.static and not entry.sticky
    assert report.record.nics[0].sticky is False


def test_apply_elsewhere_stays_sticky_and_yes_forces_it_on_vxlan_bridges(tmp_path):
    k = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, Store(str(tmp_path / "1")))
    assert k.entries[(10, MAC, 0)].sticky
    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0",)))
    cfg = config("[manage]\nbridges = br0\nsticky = yes\n")
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), cfg, k, Store(str(tmp_path / "2")))
    assert k.entries[(10, MAC, 0)].sticky


# --- taking over a remote EVPN MAC, and nothing else -----------------------------------------

def remote(ifindex=30, extern_learn=True, on_vxlan=True, static=False, sticky=False):
    return FdbEntry(mac=MAC, ifindex=ifindex, static=static, local=False, sticky=sticky,
                    extern_learn=extern_learn, on_vxlan=on_vxlan)


def test_an_extern_learn_entry_on_a_vxlan_port_of_the_bridge_may_be_taken_over():
    assert entry_conflict("vnet0", 11, MAC, remote(), owned=False) is None


@pytest.mark.parametrize("entry, word", [
    (remote(on_vxlan=False), "externally learned"),  # a control plane's entry on an ordinary port
    (remote(extern_learn=False, static=True, sticky=True), "static"),  # zebra's sticky remote MAC, or an admin's
    (FdbEntry(mac=MAC, ifindex=30, static=True, local=False), "static"),
    (FdbEntry(mac=MAC, ifindex=30, static=False, local=True), "local"),
])
def test_every_other_foreign_entry_is_still_refused(entry, word):
    reason = entry_conflict("vnet0", 11, MAC, entry, owned=False)
    assert reason and "already has a %s FDB entry" % word in reason


def test_resume_takes_the_mac_over_from_the_remote_entry_zebra_installed(tmp_path, caplog):
    """The migration target: the MAC is still remote on the VXLAN port when the guest resumes here."""
    import logging

    caplog.set_level(logging.INFO, logger="fdbhook.engine")
    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0",)))
    store = Store(str(tmp_path))
    domain = domxml.parse_domain(domain_xml([bridge_nic()]))
    assert not apply_domain(domain, config(), k, store, paused=True).failures
    k.add_entry(10, remote(on_vxlan=False))  # as the kernel reports it: current.read_port finds the VXLAN port
    report = reapply_record("qemu", "t1", k, store, config(), paused=False)
    assert [r.status for r in report.results] == ["changed"]
    assert k.entries[(10, MAC, 0)].ifindex == 11 and k.entries[(10, MAC, 0)].static
    assert "vnet0 on br0: %s taken over from EVPN's remote entry on the VXLAN port (ifindex 30)" % MAC in caplog.text


def test_a_remote_entry_on_a_vxlan_port_of_another_bridge_is_refused(tmp_path):
    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0",)), master=99)
    k.add_entry(10, remote(on_vxlan=False))
    report = apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, Store(str(tmp_path)))
    assert report.failures and "externally learned" in report.one_line()
    assert k.entries[(10, MAC, 0)].ifindex == 30


# --- FRR's JSON ----------------------------------------------------------------------------------

def test_parse_macs_of_captured_frr_8_4_output():
    macs = evpn.parse_macs(fixture("show-evpn-mac-vni-all-8.4.json"))
    assert macs["52:54:00:e0:00:01"] == [{"vni": 100, "type": "local", "intf": "vnet0", "vtep": None,
                                          "local_seq": 0, "remote_seq": 0, "moves": 0, "duplicate": False}]
    assert macs["52:54:00:e0:00:02"][0]["type"] == "remote" and macs["52:54:00:e0:00:02"][0]["vtep"] == "198.18.0.2"
    assert evpn.parse_macs("") == {} and evpn.parse_macs("{}") == {}
    with pytest.raises(ValueError):
        evpn.parse_macs("[1, 2]")


def test_port_view_in_words():
    view = evpn.FrrView(True, evpn.parse_macs(fixture("show-evpn-mac-vni-all-8.4-remote.json")))
    assert evpn.port_view(view, "52:54:00:e0:00:02", "vnet1", False) == {
        "advertised": True, "vni": [100], "duplicate": False, "problem": None, "seq": 0}
    assert evpn.port_view(view, "52:54:00:e0:00:01", "vnet0", False)["problem"] == \
        "FRR has it as a remote MAC at VTEP 198.18.0.1"
    assert evpn.port_view(view, "52:54:00:e0:00:77", "vnet7", False)["problem"] == "not known to FRR"
    assert evpn.port_view(view, "52:54:00:e0:00:77", "vnet7", True)["problem"] is None  # paused: rightly absent
    assert evpn.port_view(evpn.FrrView(False), MAC, "vnet0", False) is None


def test_read_macs_without_vtysh_says_nothing_and_a_silent_frr_is_an_error():
    assert not evpn.read_macs(env={}, which=lambda *a, **k: None).installed

    def run(argv, **kw):
        assert argv == ["/usr/bin/vtysh", "-N", "fxe-1", "-c", "show evpn mac vni all json"]
        return subprocess.CompletedProcess(argv, 1, "", "% Can't open configuration file /etc/frr/fxe-1/vtysh.conf "
                                           "due to 'No such file or directory'.\nExiting: failed to connect to any "
                                           "daemons.\n")
    view = evpn.read_macs(env={"FDBHOOK_FRR_PATHSPACE": "fxe-1"}, run=run, which=lambda *a, **k: "/usr/bin/vtysh")
    assert view.installed and not view.ok and view.error.endswith("failed to connect to any daemons.")


# --- status and explain ---------------------------------------------------------------------------

def test_status_shows_what_evpn_advertised_and_flags_what_frr_does_not_know(tmp_path):
    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1")))
    store = Store(str(tmp_path))
    xml = domain_xml([bridge_nic(mac="52:54:00:e0:00:02", dev="vnet1", alias="net1"),
                      bridge_nic(mac="52:54:00:e0:00:05", dev="vnet0")])
    apply_domain(domxml.parse_domain(xml), config(), k, store)
    calls = []

    def frr():
        calls.append(1)
        return evpn.FrrView(True, evpn.parse_macs(fixture("show-evpn-mac-vni-all-8.4-remote.json")))
    data = collect(config(), k, store, frr=frr)
    assert len(calls) == 1
    ports = {p["name"]: p for p in data["bridges"][0]["ports"]}
    assert ports["vnet1"]["evpn"]["52:54:00:e0:00:02"]["advertised"]
    assert ports["vnet0"]["evpn"]["52:54:00:e0:00:05"]["problem"] == "not known to FRR"
    text = render_text(data)
    assert "EVPN: 52:54:00:e0:00:02 advertised (VNI 100, sequence 0)" in text
    assert "EVPN: 52:54:00:e0:00:05 NOT advertised: not known to FRR" in text
    assert not collect(config(), k, store, frr=lambda: evpn.FrrView(False))["bridges"][0]["ports"][1].get("evpn")
    assert "EVPN" not in render_text(collect(config(), k, store, frr=lambda: evpn.FrrView(False)))


def test_status_never_asks_frr_for_a_bridge_without_vxlan_port(tmp_path):
    k = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    store = Store(str(tmp_path))
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, store)
    collect(config(), k, store, frr=lambda: pytest.fail("vtysh asked for a bridge without VXLAN port"))


def test_explain_names_the_sticky_rule_and_why(tmp_path):
    from fdbhook.status import explain

    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0",)))
    text = render_explain(explain(config(), k, Store(str(tmp_path)), "br0"))
    assert "guest entries not sticky: sticky = auto ([manage]): off, br0 has VXLAN port vxlan100" in text
    k = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    assert "guest entries sticky: sticky = auto ([manage]): on" in render_explain(
        explain(config(), k, Store(str(tmp_path)), "br0"))


def test_explain_says_when_a_port_still_has_entries_applied_under_the_old_rule(tmp_path):
    """A VXLAN port added after the guest started: its entries stay sticky until the next apply."""
    from fdbhook.status import explain

    k = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    store = Store(str(tmp_path))
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, store)
    with_vxlan(k)
    text = render_explain(explain(config(), k, store, "br0"))
    assert "vnet0: its entries are sticky, as applied before; the next start, reconnect or `fdbhook apply` " \
           "follows the rule" in text
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, store)
    assert not k.entries[(10, MAC, 0)].sticky
    assert "as applied before" not in render_explain(explain(config(), k, store, "br0"))


# --- announcing again what FRR missed (FRR 10 drops a new tap's entry on a loaded host) -----------

def test_a_running_guests_mac_frr_does_not_know_is_announced_again_and_nothing_else(tmp_path):
    from fdbhook.engine import announce_to_frr

    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1")))
    store = Store(str(tmp_path))
    nics = [bridge_nic("52:54:00:e0:00:01"), bridge_nic("52:54:00:e0:00:03", dev="vnet1", alias="net1")]
    apply_domain(domxml.parse_domain(domain_xml(nics)), config(), k, store)
    known = evpn.parse_macs(fixture("show-evpn-mac-vni-all-8.4.json"))
    assert "52:54:00:e0:00:01" in known and "52:54:00:e0:00:03" not in known
    assert announce_to_frr(k, store, lambda: evpn.FrrView(True, known)) == (1, 1)
    assert [(e.mac, e.ifindex, e.static) for e in k.announced] == [("52:54:00:e0:00:03", 12, True)]
    before = dict(k.entries)
    assert announce_to_frr(k, store, lambda: evpn.FrrView(True, dict(known, **{"52:54:00:e0:00:03": [{}]}))) == (0, 0)
    assert k.entries == before and len(k.announced) == 1
    # FRR not answering, or absent: nothing written
    assert announce_to_frr(k, store, lambda: evpn.FrrView(True, error="no zebra")) == (0, 0)
    assert announce_to_frr(k, store, lambda: evpn.FrrView(False)) == (0, 0)
    assert len(k.announced) == 1


def test_announcing_never_asks_frr_without_a_vxlan_port_nor_for_a_paused_guest(tmp_path):
    from fdbhook.engine import announce_to_frr

    k = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    store = Store(str(tmp_path))
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, store)
    assert announce_to_frr(k, store, lambda: pytest.fail("vtysh asked for a bridge without VXLAN port")) == (0, 0)
    k = with_vxlan(FakeKernel.bridge_with_ports("br0", ("vnet0",)))
    store = Store(str(tmp_path / "paused"))
    assert not apply_domain(domxml.parse_domain(domain_xml([bridge_nic()])), config(), k, store, paused=True).failures
    assert announce_to_frr(k, store, lambda: pytest.fail("vtysh asked for a paused guest")) == (0, 0)
