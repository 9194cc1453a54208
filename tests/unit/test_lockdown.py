"""Lock-down at the join (fdbhook.joined.decide_lockdown, fdbhook.lockdown): the pure decision, the pending
record, and its settling, with a fake kernel adapter."""

import json
import os
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
    store.save_pending(99, {"format": 1})  # a bad record, its copy as bad: quarantined, nothing touched
    assert lockdown.settle(kernel, store, only={99}) == {99: "bad record quarantined"}
    assert [i for i, _ in store.pending()] == [11]
    assert [os.path.basename(q).split(".")[0] for q in store.quarantined()] == ["pending-99", "pending-99"]
    assert not os.path.exists(store.pending_prev_path(99))


@pytest.mark.parametrize("damage", [b"", b"{\"format\": 1, \"ifi", b"[]", b"\xff\xfe", "directory"])
def test_a_damaged_pending_record_is_quarantined_and_its_second_copy_puts_the_port_back_as_it_was(tmp_path,
                                                                                                  damage):
    kernel, config, store = fake_host(tmp_path)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10, now=1000.0)
    path = store.pending_path(11)
    with open(store.pending_prev_path(11)) as handle:
        assert json.load(handle) == store.pending()[0][1]  # the second copy is the record
    os.unlink(path)
    if damage == "directory":
        os.mkdir(path)
    else:
        with open(path, "wb") as handle:
            handle.write(damage)
    assert lockdown.settle(kernel, store, now=1031.0) == {11: "restored"}
    link = kernel.by_name("vnet0")
    assert (link.learning, link.flood) == (True, False)  # the original state, from the copy
    assert store.pending() == [] and not os.path.exists(store.pending_prev_path(11))
    assert [os.path.basename(q).split(".")[0] for q in store.quarantined()] == ["pending-11"]


def test_a_claim_of_a_port_whose_pending_record_was_damaged_records_the_original_state_from_the_copy(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10, now=1000.0)
    with open(store.pending_path(11), "w") as handle:
        json.dump({"format": 1, "ifindex": 12, "port": "vnet0"}, handle)  # JSON, but not this port's record
    engine.apply_domain(parse_domain(domain_xml([bridge_nic(dev="vnet0")]), driver="qemu"), config, kernel, store)
    rec, = store.load("qemu", "t1").nics
    assert (rec.prev_learning, rec.prev_flood) == (True, False)
    assert store.pending() == [] and len(store.quarantined()) == 1


def test_the_second_copy_is_written_first_and_does_not_outlive_a_record_that_could_not_be_written(tmp_path,
                                                                                                   monkeypatch):
    from fdbhook import state
    from fdbhook.errors import StateError

    kernel, config, store = fake_host(tmp_path)
    written, real = [], state._atomic_write

    def full_disk(path, data, durable=True):
        written.append(os.path.basename(os.path.dirname(path)))
        if path == store.pending_path(12):
            raise StateError(path=path, reason="No space left on device")
        real(path, data, durable)

    monkeypatch.setattr(state, "_atomic_write", full_disk)
    store.save_pending(11, {"format": 1})
    assert written == ["pending.prev", "pending"]
    with pytest.raises(StateError):
        store.save_pending(12, {"format": 1})
    assert not os.path.exists(store.pending_prev_path(12)) and [i for i, _ in store.pending()] == [11]
    store.remove_pending(11)
    assert os.listdir(os.path.dirname(store.pending_prev_path(11))) == [] and store.pending() == []


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
    assert not [e for e in kernel.entries.values() if e.ifindex == 11]  # the predicted entry went too


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


# --- the entry the port predicts (fdbhook.joined.predicted_mac) ------------------------------------------

def test_the_port_predicts_the_nic_mac_a_qemu_tap_under_libvirt_s_prefix_an_lxc_peer_exactly():
    from fdbhook.joined import predicted_mac

    assert predicted_mac(port(mac="fe:54:00:12:34:56")) == "52:54:00:12:34:56"
    assert predicted_mac(port(mac="fe:16:3e:12:34:56")) is None  # not libvirt's qemu prefix: no guess
    assert predicted_mac(port(mac="52:54:00:12:34:56")) is None  # not a tap address
    lxc = port(kind="veth", mac="aa:bb:cc:00:00:01", peer_mac="00:16:3e:00:00:07", peer_kind="veth")
    assert predicted_mac(lxc) == "00:16:3e:00:00:07"
    assert predicted_mac(replace(lxc, peer_mac="01:00:5e:00:00:07")) is None  # multicast: never an entry
    assert predicted_mac(replace(lxc, peer_mac=None, peer_kind=None)) is None


def entries_on(kernel, ifindex):
    return sorted((e.mac, e.vlan) for e in kernel.entries.values() if e.ifindex == ifindex and e.static)


def test_the_lock_down_puts_the_predicted_entry_in_and_the_bound_takes_it_out(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    decision = lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10, now=1000.0)
    assert decision.lock and decision.why.endswith("entry 52:54:00:00:00:01 predicted")
    assert entries_on(kernel, 11) == [("52:54:00:00:00:01", 0)]
    # learning and flood off before the entry
    assert [op.kind for op in kernel.executed] == ["set_flags", "flush", "fdb_replace"]
    (_, data), = store.pending()
    assert data["entries"] == [["52:54:00:00:00:01", 0]]
    text = "\n".join(status._pending_lines(lockdown.describe(store, now=1010.0)))
    assert "static entry for 52:54:00:00:00:01 predicted from the port" in text
    assert lockdown.settle(kernel, store, now=1031.0) == {11: "restored"}
    assert entries_on(kernel, 11) == [] and kernel.by_name("vnet0").learning is True


def test_a_claim_keeps_a_right_prediction_and_takes_a_wrong_one_out(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10)
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet1"), "br0", 10)
    assert entries_on(kernel, 12) == [("52:54:00:00:00:02", 0)]
    # vnet0's NIC is 52:54:00:00:00:01 (predicted right); vnet1's is an admin's 02:54:00:00:00:02
    right = parse_domain(domain_xml([bridge_nic(dev="vnet0")]), driver="qemu")
    assert not engine.apply_domain(right, config, kernel, store).failures
    assert entries_on(kernel, 11) == [("52:54:00:00:00:01", 0)]
    wrong = parse_domain(domain_xml([bridge_nic(mac="02:54:00:00:00:02", dev="vnet1")], name="t2"),
                         driver="qemu")
    assert not engine.apply_domain(wrong, config, kernel, store).failures
    assert entries_on(kernel, 12) == [("02:54:00:00:00:02", 0)]
    assert store.pending() == []
    engine.teardown_domain("qemu", "t2", kernel, store)
    assert entries_on(kernel, 12) == [] and kernel.by_name("vnet1").learning is True


def test_no_prediction_for_a_mac_someone_has_or_with_hotplug_predict_off(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    # a known NIC has it: locked down, no entry
    assert lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10,
                              taken=frozenset(["52:54:00:00:00:01"])).lock
    assert entries_on(kernel, 11) == []
    # an entry on another port has it (here the uplink's static entry)
    kernel.links_by_index[13] = replace(kernel.links_by_index[12], name="vnet2", ifindex=13, mac="fe:54:00:00:00:03")
    kernel.add_entry(10, FdbEntry(mac="52:54:00:00:00:03", ifindex=12, static=False, local=False))
    assert lockdown.lock_down(kernel, store, config, kernel.by_name("vnet2"), "br0", 10).lock
    assert entries_on(kernel, 13) == [] and kernel.fdb_get("52:54:00:00:00:03", 10).ifindex == 12
    off = parse_config("[manage]\nbridges = br0\nhotplug_predict = no\n",
                       env={"FDBHOOK_STATE_DIR": str(tmp_path / "state")})
    assert not off.hotplug_predict and config.hotplug_predict
    assert lockdown.lock_down(kernel, store, off, kernel.by_name("vnet1"), "br0", 10).lock
    assert entries_on(kernel, 12) == []
    assert all(data["entries"] == [] for _, data in store.pending())


def test_on_a_vlan_filtering_bridge_the_prediction_goes_on_every_vlan_the_port_carries(tmp_path):
    kernel, config, store = fake_host(tmp_path)
    kernel.filtering[10] = True
    kernel.vlans[11] = {1: (True, True), 20: (False, False)}
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10)
    assert entries_on(kernel, 11) == [("52:54:00:00:00:01", 1), ("52:54:00:00:00:01", 20)]
    kernel.vlans[12] = {}  # no VLAN: nothing to put an entry on
    lockdown.lock_down(kernel, store, config, kernel.by_name("vnet1"), "br0", 10)
    assert entries_on(kernel, 12) == []


def test_a_pending_record_with_malformed_predicted_entries_is_refused():
    good = {"format": 1, "ifindex": 7, "port": "vnet0", "bridge_ifindex": 10, "learning": True, "flood": True,
            "until": 1.0}
    for bad in ([["nonsense", 0]], [["52:54:00:00:00:01", 5000]], "x", [[1]]):
        with pytest.raises(ValueError):
            lockdown.parse_pending(7, dict(good, entries=bad))
    assert lockdown.parse_pending(7, good)[-1] == frozenset()


def test_a_failed_read_for_the_prediction_still_locks_the_port_down(tmp_path):
    from fdbhook.errors import KernelError

    kernel, config, store = fake_host(tmp_path)

    def broken(*args, **kwargs):
        raise KernelError(what="bridge fdb get", reason="Operation not permitted (errno 1)")

    kernel.fdb_get = broken
    assert lockdown.lock_down(kernel, store, config, kernel.by_name("vnet0"), "br0", 10).lock
    assert entries_on(kernel, 11) == [] and kernel.by_name("vnet0").learning is False
