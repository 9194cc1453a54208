"""Lock-down at the join (fdbhook.joined.decide_lockdown, fdbhook.lockdown): the pure decision, the pending
record, and its settling, with a fake kernel adapter."""

from dataclasses import replace

import pytest

from fdbhook import engine, lockdown, status
from fdbhook.config import ConfigError, parse_config
from fdbhook.domxml import parse_domain
from fdbhook.joined import JoinedPort, decide_lockdown, guest_port
from fdbhook.model import FdbEntry
from fdbhook.state import Store
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, domain_xml


def port(name="vnet4", kind="tun", mac="fe:54:00:00:00:04", peer_mac=None, peer_kind=None):
    return JoinedPort(name=name, kind=kind, mac=mac, bridge="br0", peer_mac=peer_mac, peer_kind=peer_kind)


def test_a_qemu_tap_is_a_guest_port_only_with_the_tap_address_and_libvirt_s_name_or_a_known_target_dev():
    assert guest_port(port()).startswith("qemu tap vnet4")
    assert guest_port(port(name="vnet12")) is not None
    assert guest_port(port(mac="52:54:00:00:00:04")) is None  # a tun without the tap address
    assert guest_port(port(name="tap0")) is None  # an admin's tap
    assert guest_port(port(name="vnetx")) is None and guest_port(port(name="vnet")) is None
    assert guest_port(port(name="mytap"), target_devs={"mytap"}).endswith("a known NIC's target dev)")
    assert guest_port(port(mac=None)) is None


def test_an_lxc_host_veth_is_a_guest_port_only_with_libvirt_s_name_and_a_veth_peer_in_the_host_namespace():
    lxc = port(kind="veth", mac="aa:bb:cc:00:00:01", peer_mac="52:54:00:00:00:07", peer_kind="veth")
    assert guest_port(lxc).startswith("lxc host veth vnet4")
    assert guest_port(replace(lxc, name="wan0")) is None  # an uplink veth
    assert guest_port(replace(lxc, peer_mac=None, peer_kind=None)) is None  # peer elsewhere (another netns)
    assert guest_port(replace(lxc, kind="macvlan")) is None


def test_uplinks_recorded_ports_foreign_entries_and_known_nics_are_never_locked_down():
    assert decide_lockdown(port()).lock
    assert not decide_lockdown(port(), uplink="vnet*").lock
    assert "uplinks" in decide_lockdown(port(), uplink="vnet*").why
    assert "qemu/web1" in decide_lockdown(port(), recorded="qemu/web1").why
    assert "52:54:00:aa:bb:cc" in decide_lockdown(port(), foreign_entries=["52:54:00:aa:bb:cc"]).why
    assert not decide_lockdown(port(), known=True).lock
    assert not decide_lockdown(port(name="eth1")).lock


def test_the_bound_is_configurable_and_zero_turns_the_lock_down_off():
    assert parse_config("[manage]\nbridges = br0\n").hotplug_lockdown == 30.0
    assert parse_config("[manage]\nhotplug_lockdown = 5\n").hotplug_lockdown == 5.0
    assert parse_config("[manage]\nhotplug_lockdown = off\n").hotplug_lockdown == 0.0
    with pytest.raises(ConfigError):
        parse_config("[manage]\nhotplug_lockdown = soon\n")


def test_a_malformed_pending_record_is_refused_not_trusted():
    with pytest.raises(ValueError):
        lockdown.parse_pending(7, {"format": 1, "ifindex": 8, "port": "vnet0"})
    with pytest.raises(ValueError):
        lockdown.parse_pending(7, {"format": 1, "ifindex": 7})
    with pytest.raises(ValueError):
        lockdown.parse_pending(7, {"format": 2})


def fake_host(tmp_path):
    kernel = FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1"))
    kernel.links_by_index[11] = replace(kernel.links_by_index[11], mac="fe:54:00:00:00:01", flood=False)
    kernel.links_by_index[12] = replace(kernel.links_by_index[12], mac="fe:54:00:00:00:02")
    config = parse_config("[manage]\nbridges = br0\nhotplug_lockdown = 30\n",
                          env={"FDBHOOK_STATE_DIR": str(tmp_path / "state")})
    return kernel, config, Store(config.state_dir)


def test_lock_down_records_the_original_state_first_and_a_claim_keeps_it_as_the_state_before(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    decision = lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10, now=1000.0)
    assert decision.lock
    link = kernel.by_name("vnet0")
    assert (link.learning, link.flood) == (False, False)
    (ifindex, data), = store.pending()
    assert (ifindex, data["learning"], data["flood"], data["until"]) == (11, True, False, 1030.0)
    again = lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10)
    assert not again.lock and again.why == "it neither learns nor floods"
    # the NIC becomes known: its record's state-before is the port's original state, the pending record goes
    domain = parse_domain(domain_xml([bridge_nic(dev="vnet0")]), driver="qemu")
    report = engine.apply_domain(domain, config, kernel, store)
    assert not report.failures
    rec, = store.load("qemu", "t1").nics
    assert (rec.prev_learning, rec.prev_flood) == (True, False)
    assert store.pending() == []


def test_settle_keeps_a_port_within_its_bound_and_puts_it_back_after(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10, now=1000.0)
    assert lockdown.settle(kernel, store, now=1010.0) == {}
    assert lockdown.describe(store, now=1010.0)[0]["left_s"] == 20.0
    assert "PENDING vnet0 on br0" in "\n".join(status._pending_lines(lockdown.describe(store, now=1010.0)))
    assert lockdown.settle(kernel, store, now=1031.0) == {11: "restored"}
    link = kernel.by_name("vnet0")
    assert (link.learning, link.flood) == (True, False) and store.pending() == []


def test_settle_drops_the_record_of_a_port_that_is_gone_and_a_malformed_one(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet1"), "br0", 10)
    kernel.remove_link("vnet1")
    assert lockdown.settle(kernel, store, everything=True, only={12}) == {12: "gone"}
    store.save_pending(99, {"format": 1})  # a bad file: removed, nothing touched
    assert lockdown.settle(kernel, store, only={99}) == {99: "bad record removed"}
    assert [i for i, _ in store.pending()] == [11]


def test_a_port_with_an_admin_static_entry_or_a_record_is_not_locked_down(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    kernel.add_entry(10, FdbEntry(mac="52:54:00:aa:bb:cc", ifindex=11, static=True, local=False))
    decision = lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10)
    assert not decision.lock and "52:54:00:aa:bb:cc" in decision.why
    assert kernel.by_name("vnet0").learning is True and store.pending() == []
    uplinks = parse_config("[manage]\nbridges = br0\nuplinks = vnet*\n",
                           env={"FDBHOOK_STATE_DIR": str(tmp_path / "state")})
    assert not lockdown.lock_down(kernel, store, uplinks, kernel.by_name("vnet1"), "br0", 10).lock
    assert kernel.executed == []


def test_a_pending_port_whose_nic_is_opted_out_is_put_back_by_the_apply_not_at_the_bound(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10, now=1000.0)
    meta = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'><fdb:interface mac='52:54:00:00:00:01' mode='off'/>"
            "</fdb:fdb></metadata>")
    domain = parse_domain(domain_xml([bridge_nic(dev="vnet0")], metadata=meta), driver="qemu")
    engine.apply_domain(domain, config, kernel, store)
    link = kernel.by_name("vnet0")
    assert (link.learning, link.flood) == (True, False)  # as it was before the lock-down
    assert store.pending() == [] and store.load("qemu", "t1") is None


def test_only_a_join_is_locked_down_not_a_flag_change_of_a_port_already_on_the_bridge(tmp_path, monkeypatch):
    from tests.unit.test_daemon import make

    monkeypatch.setenv("FDBHOOK_STATE_DIR", str(tmp_path / "state"))
    d = make(tmp_path)
    kernel = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    kernel.links_by_index[11] = replace(kernel.links_by_index[11], mac="fe:54:00:00:00:01")
    d._lockdown_events(kernel, [("new", 11, "vnet0", 10)], {}, {11: 10})  # e.g. a teardown putting it back
    assert kernel.by_name("vnet0").learning is True and d.store().pending() == []
    masters = {11: None}
    d._lockdown_events(kernel, [("new", 11, "vnet0", 10)], {}, masters)  # it joins
    assert kernel.by_name("vnet0").learning is False and masters == {11: 10}
    assert [i for i, _ in d.store().pending()] == [11]
