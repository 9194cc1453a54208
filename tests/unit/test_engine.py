"""Engine logic over the fake kernel adapter: records, idempotency, rollback."""

import os

from fdbhook import domxml
from fdbhook.engine import apply_domain, reconcile, resync, teardown_domain
from fdbhook.model import FdbEntry
from fdbhook.state import Store
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, config, domain_xml

XML = domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")])


def make_lab(tmp_path):
    k = FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1", "eth0"))
    return k, Store(str(tmp_path)), config()


def test_apply_then_again_is_idempotent(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    dom = domxml.parse_domain(XML)
    report = apply_domain(dom, cfg, k, store)
    assert [r.status for r in report.results] == ["changed", "changed"]
    assert k.by_name("vnet0").learning is False and k.by_name("vnet0").flood is False
    assert k.fdb_get("52:54:00:00:00:01", 10).ifindex == k.by_name("vnet0").ifindex
    assert k.by_name("eth0").learning is True  # the uplink is never touched
    k.executed.clear()
    report = apply_domain(dom, cfg, k, store)
    assert [r.status for r in report.results] == ["unchanged", "unchanged"]
    assert k.executed == []
    rec = store.load("qemu", "t1")
    assert [n.port for n in rec.nics] == ["vnet0", "vnet1"]
    assert rec.nics[0].prev_learning is True  # the second run kept the original


def test_an_apply_that_changes_nothing_writes_no_file(tmp_path, monkeypatch):
    """A repeated hook (or the join and the start hook of one port) costs no write and no fsync."""
    import fdbhook.state as state

    k, store, cfg = make_lab(tmp_path)
    dom = domxml.parse_domain(XML)
    apply_domain(dom, cfg, k, store)
    writes = []
    real = state._atomic_write
    monkeypatch.setattr(state, "_atomic_write", lambda path, *a, **kw: writes.append(path) or real(path, *a, **kw))
    apply_domain(dom, cfg, k, store)
    assert writes == []
    # A record whose second copy is missing (written by an older fdbhook) is written again, whole.
    path = store.path("qemu", "t1")
    os.unlink(store.prev_path(path))
    apply_domain(dom, cfg, k, store)
    assert sorted(writes) == sorted([store.prev_path(path), path]) and store.is_saved(store.load("qemu", "t1"))


def test_teardown_restores_and_removes_record(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    report = teardown_domain("qemu", "t1", k, store)
    assert [r.status for r in report.results] == ["removed", "removed"]
    assert k.by_name("vnet0").learning is True and k.by_name("vnet0").flood is True
    assert k.fdb_get("52:54:00:00:00:01", 10) is None
    assert store.load("qemu", "t1") is None
    assert teardown_domain("qemu", "t1", k, store).results == ()


def test_teardown_after_port_is_gone(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    k.remove_link("vnet0")
    report = teardown_domain("qemu", "t1", k, store)
    assert sorted(r.status for r in report.results) == ["gone", "removed"]
    assert store.load("qemu", "t1") is None


def test_failure_rolls_the_port_back(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    k.fail_on = "flush"
    report = apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert [r.status for r in report.results] == ["failed", "held"]  # the second is never sent
    assert "injected failure" in report.one_line() and "port restored" in report.one_line()
    assert report.one_line().startswith("domain t1: NIC net0 (52:54:00:00:00:01): ")
    for name in ("vnet0", "vnet1"):
        assert k.by_name(name).learning is True and k.by_name(name).flood is True
    assert k.fdb_get("52:54:00:00:00:01", 10) is None
    assert store.load("qemu", "t1") is None


def test_one_failing_port_undoes_the_whole_run(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    k.fail_on, k.fail_port = "set_flags", "vnet1"
    report = apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert [r.status for r in report.results] == ["rolled back", "failed"]
    for name in ("vnet0", "vnet1"):
        assert k.by_name(name).learning is True and k.by_name(name).flood is True
    assert k.entries == {} and store.load("qemu", "t1") is None


def test_on_error_continue_keeps_what_worked(tmp_path):
    k, store, _ = make_lab(tmp_path)
    cfg = config("[manage]\nbridges = br0\n[hook]\non_error = continue\n")
    k.fail_on, k.fail_port = "set_flags", "vnet1"
    report = apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert [r.status for r in report.results] == ["changed", "failed"]
    assert [n.port for n in store.load("qemu", "t1").nics] == ["vnet0"]


def test_bad_input_changes_nothing(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    xml = domain_xml([bridge_nic(), bridge_nic(mac="01:00:5e:00:00:01", dev="vnet1", alias="net1")])
    report = apply_domain(domxml.parse_domain(xml), cfg, k, store)
    assert [r.status for r in report.results] == ["held", "failed"]
    assert k.executed == [] and store.load("qemu", "t1") is None
    assert "multicast" in report.one_line() and "net1" in report.one_line()


def test_conflicting_static_entry_is_not_moved(tmp_path):
    k, store, _ = make_lab(tmp_path)
    cfg = config("[manage]\nbridges = br0\n[hook]\non_error = continue\n")
    eth0 = k.by_name("eth0")
    k.add_entry(10, FdbEntry(mac="52:54:00:00:00:01", ifindex=eth0.ifindex,
                                                    static=True, local=False))
    report = apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert report.results[0].status == "failed" and "not ours" in report.results[0].message
    assert k.fdb_get("52:54:00:00:00:01", 10).ifindex == eth0.ifindex
    assert k.by_name("vnet0").learning is True
    assert report.results[1].status == "changed"


def test_dry_run_changes_nothing(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    report = apply_domain(domxml.parse_domain(XML), cfg, k, store, dry_run=True)
    assert [r.status for r in report.results] == ["planned", "planned"]
    assert k.executed == [] and store.load("qemu", "t1") is None


def test_learned_entries_flushed_but_static_kept(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    vnet0 = k.by_name("vnet0").ifindex
    k.add_entry(10, FdbEntry(mac="02:00:00:00:00:99", ifindex=vnet0, static=False,
                                                    local=False))
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert k.fdb_get("02:00:00:00:00:99", 10) is None


META_VLAN = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>"
             "<fdb:interface mac='52:54:00:00:00:01' vlan='42' trunk='100-101'/></fdb:fdb></metadata>")


def test_vlans_on_a_filtering_bridge(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    k.filtering[10] = True
    dom = domxml.parse_domain(domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet1")],
                                         metadata=META_VLAN))
    report = apply_domain(dom, cfg, k, store)
    assert [r.status for r in report.results] == ["changed", "changed"], report.one_line()
    vnet0, vnet1 = k.by_name("vnet0").ifindex, k.by_name("vnet1").ifindex
    assert k.port_vlans(vnet0) == ((42, True, True), (100, False, False), (101, False, False))
    assert sorted(v for (_, mac, v) in k.entries if mac == "52:54:00:00:00:01") == [42, 100, 101]
    # a NIC without VLAN config gets its entry on the VLANs its port carries (default pvid 1)
    assert [v for (_, mac, v) in k.entries if mac == "52:54:00:00:00:02"] == [1]
    assert k.port_vlans(vnet1) == ((1, True, True),)
    assert apply_domain(dom, cfg, k, store).results[0].status == "unchanged"
    teardown_domain("qemu", "t1", k, store)
    assert k.port_vlans(vnet0) == ((1, True, True),)
    assert k.entries == {}


def test_vlans_refused_without_filtering(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    dom = domxml.parse_domain(domain_xml([bridge_nic()], metadata=META_VLAN))
    report = apply_domain(dom, cfg, k, store)
    assert report.results[0].status == "failed"
    assert "VLANs requested but bridge br0 has vlan_filtering off" in report.one_line()
    assert k.executed == []


def test_network_section_gives_vlans(tmp_path):
    k, store, _ = make_lab(tmp_path)
    k.filtering[10] = True
    cfg = config("[manage]\nnetworks = lan\n[network lan]\nvlan = 7\n")
    xml = domain_xml(["<interface type='network'><mac address='52:54:00:00:00:03'/>"
                      "<source network='lan' bridge='br0'/><target dev='vnet0'/></interface>"])
    apply_domain(domxml.parse_domain(xml), cfg, k, store)
    assert k.port_vlans(k.by_name("vnet0").ifindex) == ((7, True, True),)


def test_vlan_filtering_policy_set_and_restored(tmp_path):
    k, store, _ = make_lab(tmp_path)
    cfg = config("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert k.filtering[10] is True
    assert store.load_bridge("br0")["prev_vlan_filtering"] is False
    apply_domain(domxml.parse_domain(domain_xml([bridge_nic(mac="52:54:00:00:00:09", dev="eth0")],
                                                name="t2")), cfg, k, store)
    teardown_domain("qemu", "t1", k, store)
    assert k.filtering[10] is True  # t2 still there
    teardown_domain("qemu", "t2", k, store)
    assert k.filtering[10] is False and store.load_bridge("br0") is None


def test_vlan_filtering_switch_is_one_request_of_the_one_write_path(tmp_path):
    k, store, _ = make_lab(tmp_path)
    cfg = config("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    first = k.executed[0]
    assert (first.kind, first.ifindex, first.vlan_filtering) == ("bridge_set", 10, True)
    assert "pending" not in store.load_bridge("br0")  # settled: a guest uses the bridge


def test_a_refused_start_puts_the_switched_bridge_back(tmp_path):
    k, store, _ = make_lab(tmp_path)
    k.fail_on, k.fail_port = "set_flags", "vnet1"
    cfg = config("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
    report = apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert report.failures
    assert k.filtering[10] is False and store.load_bridge("br0") is None and store.load("qemu", "t1") is None


def test_a_failed_bridge_switch_fails_the_nics_on_it_and_changes_nothing(tmp_path):
    k, store, _ = make_lab(tmp_path)
    k.fail_on = "bridge_set"  # the kernel can filter (probed); this one request fails
    cfg = config("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
    report = apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert "bridge br0: setting vlan_filtering failed" in report.one_line()
    assert k.filtering.get(10, False) is False and store.load_bridge("br0") is None
    assert store.load("qemu", "t1") is None and k.by_name("vnet0").learning is True


def test_a_pending_bridge_switch_is_finished_or_rolled_back_by_the_next_run(tmp_path):
    from fdbhook import txn

    k, store, _ = make_lab(tmp_path)
    k.filtering[10] = True  # a run switched it and died before settling
    pending = {"bridge": "br0", "ifindex": 10, "prev_vlan_filtering": False, "set_vlan_filtering": True,
               "restore": True, "pending": True}
    store.save_bridge("br0", pending)
    assert txn.needs_recovery(store)
    with store.lock():
        txn.recover(k, store)
    assert k.filtering[10] is False and store.load_bridge("br0") is None  # no guest on it: undone
    cfg = config("[manage]\nbridges = br0\n")
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    k.filtering[10] = True
    store.save_bridge("br0", pending)
    with store.lock():
        txn.recover(k, store)
    assert k.filtering[10] is True and "pending" not in store.load_bridge("br0")  # a guest uses it: finished
    assert not txn.needs_recovery(store)


def test_vlan_filtering_unsupported_said_once(tmp_path, caplog):
    k, store, _ = make_lab(tmp_path)
    k.vlan_supported = False
    cfg = config("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
    with caplog.at_level("WARNING", logger="fdbhook"):
        report = apply_domain(domxml.parse_domain(XML), cfg, k, store)
        apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert [r.status for r in report.results] == ["changed", "changed"]
    assert sum("CONFIG_BRIDGE_VLAN_FILTERING" in r.message for r in caplog.records) == 1


def mac_changed_xml(configured="52:54:00:00:00:01", current="52:54:00:00:00:99"):
    """The live XML of libvirt >= 11.2 after the guest set its own MAC (trustGuestRxFilters='yes')."""
    nic = bridge_nic(mac=configured).replace(
        "<mac address='%s'/>" % configured, "<mac address='%s' currentAddress='%s'/>" % (configured, current))
    return domain_xml([nic, bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")])


def test_current_address_is_the_mac_in_use():
    nic = domxml.parse_domain(mac_changed_xml()).nics[0]
    assert (nic.mac, nic.config_mac) == ("52:54:00:00:00:99", "52:54:00:00:00:01")
    plain = domxml.parse_domain(XML).nics[0]
    assert (plain.mac, plain.config_mac) == ("52:54:00:00:00:01", None)


def test_guest_mac_change_is_one_plan_on_one_port(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    k.executed.clear()
    report = apply_domain(domxml.parse_domain(mac_changed_xml()), cfg, k, store)
    assert report.results[0].message.startswith("guest MAC changed 52:54:00:00:00:01 -> 52:54:00:00:00:99")
    # New entry first, then the old one out; learning and flood never touched.
    assert [(op.kind, op.mac) for op in k.executed] == [("fdb_replace", "52:54:00:00:00:99"),
                                                         ("fdb_del", "52:54:00:00:00:01")]
    assert k.fdb_get("52:54:00:00:00:99", 10).ifindex == k.by_name("vnet0").ifindex
    assert k.fdb_get("52:54:00:00:00:01", 10) is None
    rec = store.load("qemu", "t1").nic("52:54:00:00:00:99")
    assert (rec.port, rec.config_mac, rec.prev_learning, rec.prev_flood) == ("vnet0", "52:54:00:00:00:01", True, True)
    # Idempotent, and the record's own plan (status, drift repair) agrees.
    k.executed.clear()
    assert [r.status for r in apply_domain(domxml.parse_domain(mac_changed_xml()), cfg, k, store).results] == [
        "unchanged", "unchanged"]
    assert resync(k, store, cfg) == (2, 0, 0) and k.executed == []
    teardown_domain("qemu", "t1", k, store)
    assert k.by_name("vnet0").learning is True and k.by_name("vnet0").flood is True
    assert k.fdb_get("52:54:00:00:00:99", 10) is None


def test_reconcile_keeps_a_known_domain_running_through_a_start_pause(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    dom = domxml.parse_domain(XML)
    apply_domain(dom, cfg, k, store)
    k.executed.clear()
    # fdbhookd sees the port join while QEMU is still at -S ("starting": None)
    # or a periodic sync catches the same moment: no entry churn.
    reconcile(dom, None, cfg, k, store, port="vnet0")
    reconcile(dom, True, cfg, k, store, port="vnet0")
    assert k.executed == []
    assert k.fdb_get("52:54:00:00:00:01", 10) is not None
    # A full sync after reconnecting trusts the live state.
    reconcile(dom, True, cfg, k, store, trust_live=True)
    assert k.fdb_get("52:54:00:00:00:01", 10) is None and store.load("qemu", "t1").paused


def test_reconcile_adds_no_entry_to_an_incoming_migration_before_it_resumes(tmp_path):
    """Destination of a live migration: the port joins (link event) and libvirt's STARTED event come
    while the guest is paused for the migration ("starting": None); only RESUMED may add the entry."""
    k, store, cfg = make_lab(tmp_path)
    dom = domxml.parse_domain(XML)
    store.mark_incoming("qemu", "t1")
    reconcile(dom, None, cfg, k, store, port="vnet0")  # before the start hook wrote a record
    assert k.fdb_get("52:54:00:00:00:01", 10) is None and store.load("qemu", "t1").paused
    apply_domain(dom, cfg, k, store, paused=True)  # the start hook
    reconcile(dom, None, cfg, k, store)  # STARTED event, domain still paused (migration)
    reconcile(dom, None, cfg, k, store, trust_live=True)  # a sync at that moment
    assert k.fdb_get("52:54:00:00:00:01", 10) is None
    assert k.by_name("vnet0").learning is False and k.by_name("vnet0").flood is False


def test_reconcile_tears_down_a_nic_the_live_xml_lost(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    one = domxml.parse_domain(domain_xml([bridge_nic()]))
    reconcile(one, False, cfg, k, store, alias="-")
    assert [n.mac for n in store.load("qemu", "t1").nics] == ["52:54:00:00:00:01"]
    assert k.by_name("vnet1").learning is True


def test_mac_change_event_fills_in_a_live_xml_that_lacks_current_address():
    from fdbhook.daemon import with_guest_mac

    dom = with_guest_mac(domxml.parse_domain(XML), "net0", "52:54:00:00:00:AA")
    assert (dom.nics[0].mac, dom.nics[0].config_mac) == ("52:54:00:00:00:aa", "52:54:00:00:00:01")
    assert dom.nics[1].mac == "52:54:00:00:00:02"
