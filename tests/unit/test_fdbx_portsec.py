"""Extra MACs, lock mode, MAB and floating MACs (issue 13): parsing, planning and the engine over the fake kernel."""

import pytest

from fdbhook import domxml, plan
from fdbhook.config import parse_config
from fdbhook.engine import apply_domain, desired_from_record, nic_security, reapply_record, released, teardown_domain
from fdbhook.errors import ConfigError, InvalidDomainXML
from fdbhook.model import CurrentPort, DesiredPort, FdbEntry, NicRecord
from fdbhook.state import Store, record_from_json, record_to_json
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, config, domain_xml

VRRP = "00:00:5e:00:01:0a"
INNER = "02:00:00:00:10:01"
MAC = "52:54:00:00:00:01"


def meta(*interfaces):
    return "<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>%s</fdb:fdb></metadata>" % "".join(interfaces)


def iface(mac=MAC, **attrs):
    return "<fdb:interface mac='%s' %s/>" % (mac, " ".join("%s='%s'" % (k.replace("_", "-"), v)
                                                           for k, v in attrs.items()))


def xml(extra=None, locked=None, floating=None, nics=None, name="t1"):
    attrs = {}
    if extra is not None:
        attrs["extra_macs"] = extra
    if locked is not None:
        attrs["locked"] = locked
    if floating is not None:
        attrs["floating_macs"] = floating
    return domain_xml(nics or [bridge_nic()], name=name, metadata=meta(iface(**attrs)) if attrs else "")


def make_lab(tmp_path, text="[manage]\nbridges = br0\n"):
    k = FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1", "vnet2", "eth0"))
    return k, Store(str(tmp_path)), config(text)


# --- parsing and config ------------------------------------------------------------

def test_metadata_extra_macs_locked_and_floating_are_parsed_and_normalised():
    dom = domxml.parse_domain(xml(extra="00-00-5E-00-01-0A, 02:00:00:00:10:01", locked="yes",
                                  floating="02:00:00:00:99:01"))
    nic = dom.nics[0]
    assert nic.extra_macs == (VRRP, INNER) and nic.locked is True
    assert nic.floating_macs == ("02:00:00:00:99:01",)


@pytest.mark.parametrize("bad, reason", [
    ("01:00:5e:00:00:01", "multicast"),
    ("00:00:00:00:00:00", "all-zero"),
    ("zz:00:00:00:00:01", "not a MAC"),
])
def test_bad_extra_mac_is_a_one_line_error_naming_domain_nic_and_reason(bad, reason):
    with pytest.raises(InvalidDomainXML) as err:
        domxml.parse_domain(xml(extra=bad))
    text = str(err.value)
    assert "t1" in text and MAC in text and "extra-macs" in text and reason in text and "\n" not in text


def test_bad_locked_value_is_refused():
    with pytest.raises(InvalidDomainXML, match="locked='maybe'"):
        domxml.parse_domain(xml(locked="maybe"))


def test_config_sections_take_extra_macs_locked_mab_and_floating():
    cfg = parse_config("[manage]\nbridges = br*\nlocked = yes\n[bridge br0]\nextra_macs = %s\nmab = yes\n"
                       "[network isolated1]\nfloating_macs = %s\nlocked = no\n" % (VRRP, INNER), env={})
    assert cfg.locked is True and cfg.mab is False
    assert cfg.bridge_policy("br0").extra_macs == (VRRP,) and cfg.bridge_policy("br0").mab is True
    assert cfg.network_policy("isolated1").floating_macs == (INNER,)
    assert cfg.network_policy("isolated1").locked is False


def test_config_refuses_a_multicast_extra_mac():
    with pytest.raises(ConfigError, match=r"\[bridge br0\] extra_macs: MAC 01:00:5e:00:00:01 is multicast"):
        parse_config("[manage]\nbridges = br0\n[bridge br0]\nextra_macs = 01:00:5e:00:00:01\n", env={})


def test_security_merges_metadata_network_bridge_and_manage():
    cfg = parse_config("[manage]\nbridges = br0\nlocked = yes\nmab = yes\n[bridge br0]\nextra_macs = %s\n"
                       "[network n1]\nlocked = no\n" % INNER, env={})
    nic = domxml.parse_domain(xml(extra=VRRP)).nics[0]
    sec = nic_security(nic, cfg, "br0", None)
    assert sec.extra_macs == (VRRP, INNER) and sec.locked and sec.mab
    assert nic_security(nic, cfg, "br0", "n1").locked is False  # the network section wins over [manage]
    locked_nic = domxml.parse_domain(xml(locked="yes")).nics[0]
    assert nic_security(locked_nic, cfg, "br0", "n1").locked is True  # the NIC's metadata wins over all
    floating = domxml.parse_domain(xml(floating=VRRP, extra=VRRP)).nics[0]
    sec = nic_security(floating, cfg, "br0", None)
    assert sec.floating_macs == (VRRP,) and VRRP not in sec.extra_macs and sec.locked is False


# --- the planner -------------------------------------------------------------------

def port(**kw):
    base = dict(port="vnet0", ifindex=11, bridge="br0", bridge_ifindex=10)
    base.update(kw)
    return DesiredPort(**base)


def have(entries=(), **kw):
    base = dict(port="vnet0", ifindex=11, exists=True, learning=True, flood=True, locked=False, mab=False,
                entries=tuple(entries))
    base.update(kw)
    return CurrentPort(**base)


def test_lock_comes_after_every_entry_and_with_learning_off():
    keys = frozenset({(MAC, 0), (VRRP, 0)})
    ops = plan.plan_port(port(entries=keys, watch=keys, locked=True), have([(k, None) for k in sorted(keys)]))
    assert [o.kind for o in ops] == ["fdb_replace", "fdb_replace", "set_flags", "flush"]
    assert (ops[2].learning, ops[2].flood, ops[2].locked) == (False, False, True)
    assert plan.render(ops[2]) == "bridge link set dev vnet0 learning off flood off locked on"


def static(mac, sticky=True):
    return FdbEntry(mac=mac, ifindex=11, static=True, local=False, sticky=sticky)


def test_unlock_comes_before_any_entry_goes():
    keys = frozenset({(MAC, 0), (VRRP, 0)})
    want = port(watch=keys, learning=True, flood=True, locked=False, mab=False)
    ops = plan.plan_port(want, have([(k, static(k[0])) for k in sorted(keys)], learning=False, flood=False,
                                    locked=True, mab=True))
    assert [o.kind for o in ops] == ["set_flags", "fdb_del", "fdb_del", "set_flags"]
    assert (ops[0].flood, ops[0].locked, ops[0].mab) == (True, False, False)
    assert ops[-1].learning is True


def test_mab_turns_learning_on_in_the_same_request_as_the_lock():
    keys = frozenset({(MAC, 0)})
    ops = plan.plan_port(port(entries=keys, watch=keys, locked=True, mab=True, learning=True),
                         have([((MAC, 0), None)], learning=False))
    flags = [o for o in ops if o.kind == "set_flags"]
    assert len(flags) == 1 and (flags[0].learning, flags[0].locked, flags[0].mab) == (True, True, True)
    assert "flush" not in [o.kind for o in ops]


def test_kernel_without_locked_ports_is_neither_locked_nor_drift():
    keys = frozenset({(MAC, 0)})
    want = port(entries=keys, watch=keys, locked=True)
    assert all(o.locked is None for o in plan.plan_port(want, have([((MAC, 0), None)], locked=None, mab=None)))
    healthy = have([((MAC, 0), static(MAC))], learning=False, flood=False, locked=None, mab=None)
    assert plan.drift(want, healthy) == []
    unlocked = have([((MAC, 0), static(MAC))], learning=False, flood=False)
    assert plan.drift(want, unlocked) == ["port unlocked"]


def test_record_with_extra_macs_stands_for_all_its_entries_and_survives_json():
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=11, bridge="br0", extra_macs=[VRRP, INNER], vids=(10, 20),
                    locked=True, mab=True)
    assert rec.extra_macs == (VRRP, INNER)
    assert rec.keys == {(m, v) for m in (MAC, VRRP, INNER) for v in (10, 20)}
    want = desired_from_record(rec, 10, paused=False)
    assert want.entries == rec.keys and want.locked is True and want.mab is True and want.learning is True
    assert desired_from_record(rec, 10, paused=True).entries == frozenset()
    gone = released(rec, 10)
    assert gone.entries == frozenset() and gone.watch == rec.keys and gone.locked is False and gone.mab is False
    from fdbhook.model import DomainRecord
    import json
    record = DomainRecord(driver="qemu", domain="t1", nics=(rec,))
    assert record_from_json(json.loads(json.dumps(record_to_json(record)))) == record


# --- the engine over the fake kernel --------------------------------------------------

def test_extra_macs_get_static_entries_on_the_port_and_go_at_teardown(tmp_path):
    k, store, cfg = make_lab(tmp_path, "[manage]\nbridges = br0\n[bridge br0]\nextra_macs = %s\n" % INNER)
    report = apply_domain(domxml.parse_domain(xml(extra=VRRP)), cfg, k, store)
    assert [r.status for r in report.results] == ["changed"], report.one_line()
    vnet0 = k.by_name("vnet0").ifindex
    for mac in (MAC, VRRP, INNER):
        entry = k.fdb_get(mac, 10)
        assert entry.ifindex == vnet0 and entry.static and entry.sticky
    rec = store.load("qemu", "t1").nics[0]
    assert rec.extra_macs == (VRRP, INNER)
    k.executed.clear()
    assert [r.status for r in apply_domain(domxml.parse_domain(xml(extra=VRRP)), cfg, k, store).results] == [
        "unchanged"]
    assert k.executed == []
    teardown_domain("qemu", "t1", k, store)
    assert all(k.fdb_get(mac, 10) is None for mac in (MAC, VRRP, INNER))


def test_drift_repair_and_pause_resume_cover_extra_macs(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(xml(extra=VRRP, locked="yes")), cfg, k, store)
    del k.entries[(10, VRRP, 0)]
    report = reapply_record("qemu", "t1", k, store, cfg)
    assert report.results[0].status == "changed" and k.fdb_get(VRRP, 10) is not None
    reapply_record("qemu", "t1", k, store, cfg, paused=True)
    assert k.fdb_get(VRRP, 10) is None and k.fdb_get(MAC, 10) is None
    assert k.by_name("vnet0").locked is True  # paused: locked with no entries, nothing gets out
    reapply_record("qemu", "t1", k, store, cfg, paused=False)
    assert k.fdb_get(VRRP, 10) is not None and k.fdb_get(MAC, 10) is not None


def test_extra_mac_change_adds_the_new_entry_before_the_old_one_goes(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(xml(extra=VRRP)), cfg, k, store)
    k.executed.clear()
    apply_domain(domxml.parse_domain(xml(extra=INNER)), cfg, k, store)
    assert [(o.kind, o.mac) for o in k.executed] == [("fdb_replace", INNER), ("fdb_del", VRRP)]
    assert store.load("qemu", "t1").nics[0].extra_macs == (INNER,)


def test_lock_mode_locks_after_entries_and_unlocks_before_they_go(tmp_path):
    k, store, cfg = make_lab(tmp_path, "[manage]\nbridges = br0\nlocked = yes\n")
    apply_domain(domxml.parse_domain(xml(extra=VRRP)), cfg, k, store)
    kinds = [(o.kind, o.locked) for o in k.executed]
    assert kinds.index(("set_flags", True)) > max(i for i, (kind, _) in enumerate(kinds) if kind == "fdb_replace")
    assert k.by_name("vnet0").locked is True
    rec = store.load("qemu", "t1").nics[0]
    assert rec.locked and rec.prev_locked is False
    k.executed.clear()
    teardown_domain("qemu", "t1", k, store)
    kinds = [(o.kind, o.locked) for o in k.executed]
    assert kinds[0] == ("set_flags", False) and k.by_name("vnet0").locked is False
    assert k.by_name("vnet0").learning is True and k.by_name("vnet0").flood is True


def test_lock_mode_turned_off_in_the_metadata_unlocks(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(xml(locked="yes")), cfg, k, store)
    assert k.by_name("vnet0").locked is True
    apply_domain(domxml.parse_domain(xml(locked="no")), cfg, k, store)
    assert k.by_name("vnet0").locked is False and store.load("qemu", "t1").nics[0].locked is False


def test_mab_keeps_learning_on_and_shows_what_was_dropped(tmp_path):
    k, store, cfg = make_lab(tmp_path, "[manage]\nbridges = br0\nlocked = yes\nmab = yes\n")
    apply_domain(domxml.parse_domain(xml()), cfg, k, store)
    link = k.by_name("vnet0")
    assert (link.locked, link.mab, link.learning, link.flood) == (True, True, True, False)
    k.add_entry(10, FdbEntry(mac="02:66:66:66:66:66", ifindex=link.ifindex, static=False, local=False,
                             locked=True))
    assert k.locked_entries(link.ifindex) == [("02:66:66:66:66:66", 0)]
    teardown_domain("qemu", "t1", k, store)
    link = k.by_name("vnet0")
    assert (link.locked, link.mab, link.learning) == (False, False, True)


def test_kernel_without_locked_ports_manages_the_port_anyway(tmp_path, caplog):
    k, store, cfg = make_lab(tmp_path, "[manage]\nbridges = br0\nlocked = yes\n")
    for name in ("vnet0", "vnet1"):
        from dataclasses import replace
        link = k.by_name(name)
        k.links_by_index[link.ifindex] = replace(link, locked=None, mab=None)
    two = domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")])
    report = apply_domain(domxml.parse_domain(two), cfg, k, store)
    assert [r.status for r in report.results] == ["changed", "changed"], report.one_line()
    assert "no locked bridge ports" in report.results[0].message
    assert caplog.text.count("lock mode asked for") == 1
    assert store.load("qemu", "t1").nics[0].locked is False
    assert [r.status for r in reapply_record("qemu", "t1", k, store, cfg).results] == ["unchanged", "unchanged"]


def test_floating_macs_leave_the_port_learning_and_unlocked(tmp_path):
    k, store, cfg = make_lab(tmp_path, "[manage]\nbridges = br0\nlocked = yes\n")
    apply_domain(domxml.parse_domain(xml(floating=VRRP)), cfg, k, store)
    link = k.by_name("vnet0")
    assert (link.learning, link.flood, link.locked) == (True, False, False)
    assert k.fdb_get(VRRP, 10) is None and k.fdb_get(MAC, 10) is not None
    assert store.load("qemu", "t1").nics[0].floating_macs == (VRRP,)
    assert [r.status for r in reapply_record("qemu", "t1", k, store, cfg).results] == ["unchanged"]


def test_same_extra_mac_on_two_running_nics_of_two_domains_is_refused_naming_both(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    assert not apply_domain(domxml.parse_domain(xml(extra=VRRP)), cfg, k, store).failures
    other = domain_xml([bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")], name="t2",
                       metadata=meta(iface(mac="52:54:00:00:00:02", extra_macs=VRRP)))
    report = apply_domain(domxml.parse_domain(other), cfg, k, store)
    line = report.one_line()
    assert report.failures and "\n" not in line
    assert line.startswith("domain t2: NIC net1 (52:54:00:00:00:02): extra MAC %s" % VRRP)
    assert "domain qemu/t1 NIC net0 (%s on vnet0)" % MAC in line
    assert k.fdb_get(VRRP, 10).ifindex == k.by_name("vnet0").ifindex
    assert k.by_name("vnet1").learning is True  # nothing applied on the refused NIC


def test_same_extra_mac_on_two_nics_of_one_domain_is_refused(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    dom = domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")],
                     metadata=meta(iface(extra_macs=VRRP), iface(mac="52:54:00:00:00:02", extra_macs=VRRP)))
    report = apply_domain(domxml.parse_domain(dom), cfg, k, store)
    assert "extra MAC %s is already in use by NIC net0 (%s) of this domain (vnet0)" % (VRRP, MAC) in report.one_line()
    assert k.fdb_get(VRRP, 10) is None  # on_error = fail: nothing applied


def test_a_dead_guests_record_claims_nothing(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    apply_domain(domxml.parse_domain(xml(extra=VRRP)), cfg, k, store)
    k.remove_link("vnet0")
    other = domain_xml([bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")], name="t2",
                       metadata=meta(iface(mac="52:54:00:00:00:02", extra_macs=VRRP)))
    assert not apply_domain(domxml.parse_domain(other), cfg, k, store).failures


def test_static_entry_of_someone_else_is_not_taken_over(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    eth0 = k.by_name("eth0").ifindex
    k.add_entry(10, FdbEntry(mac=VRRP, ifindex=eth0, static=True, local=False))
    report = apply_domain(domxml.parse_domain(xml(extra=VRRP)), cfg, k, store)
    assert "MAC %s already has a static FDB entry on another port" % VRRP in report.one_line()
    assert k.fdb_get(VRRP, 10).ifindex == eth0
