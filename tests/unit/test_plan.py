"""The planner: desired port state vs current port state -> ordered ops (pure)."""

from fdbhook import plan
from fdbhook.engine import desired_from_record, released
from fdbhook.model import CurrentPort, DesiredPort, FdbEntry, NicRecord

MAC = "52:54:00:00:00:01"
NEW = "52:54:00:00:00:99"


def want(entries=((MAC, 0),), watch=(), **kw):
    keys = frozenset(entries)
    base = dict(port="vnet0", ifindex=10, bridge="br0", bridge_ifindex=2, entries=keys,
                watch=keys | frozenset(watch), sticky=True)
    base.update(kw)
    return DesiredPort(**base)


def static(mac=MAC, vid=0, ifindex=10, sticky=True, static=True, local=False):
    return FdbEntry(mac=mac, ifindex=ifindex, static=static, local=local, sticky=sticky, vlan=vid)


def have(entries=(), learning=False, flood=False, membership=None, exists=True):
    return CurrentPort(port="vnet0", ifindex=10, exists=exists, learning=learning, flood=flood,
                       entries=tuple(entries), membership=membership)


def kinds(ops):
    return [(o.kind, o.learning, o.flood) for o in ops]


def test_apply_order_entry_first_then_flags_then_flush():
    ops = plan.plan_port(want(), have([((MAC, 0), None)], learning=True, flood=True), flush=True)
    assert kinds(ops) == [("fdb_replace", None, None), ("set_flags", False, False), ("flush", None, None)]
    assert ops[0].sticky and ops[0].mac == MAC and ops[0].vlan == 0


def test_nothing_to_do_when_in_place():
    assert plan.plan_port(want(), have([((MAC, 0), static())])) == ()
    assert plan.drift(want(), have([((MAC, 0), static())])) == []


def test_heals_only_drift():
    ops = plan.plan_port(want(), have([((MAC, 0), static())], learning=True))
    assert kinds(ops) == [("set_flags", False, None), ("flush", None, None)]
    assert plan.drift(want(), have([((MAC, 0), static())], learning=True)) == ["learning on"]


def test_dynamic_entry_elsewhere_is_replaced_static_elsewhere_is_a_conflict():
    dyn = static(ifindex=99, static=False)
    assert plan.conflicts(want(), have([((MAC, 0), dyn)])) == []
    assert plan.plan_port(want(), have([((MAC, 0), dyn)]))[0].kind == "fdb_replace"
    for entry in (static(ifindex=99), static(ifindex=99, static=False, local=True)):
        assert "not ours" in plan.conflicts(want(), have([((MAC, 0), entry)]))[0]


def test_mac_change_adds_the_new_entry_before_the_old_one_goes_and_leaves_flags_alone():
    w = want(entries=((NEW, 0),), watch=((MAC, 0),))
    ops = plan.plan_port(w, have([((MAC, 0), static()), ((NEW, 0), None)]))
    assert [(o.kind, o.mac) for o in ops] == [("fdb_replace", NEW), ("fdb_del", MAC)]


def test_paused_guest_keeps_the_port_locked_down_without_entries():
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=10, bridge="br0", sticky=True)
    w = desired_from_record(rec, 2, paused=True)
    assert [(o.kind, o.mac) for o in plan.plan_port(w, have([((MAC, 0), static())]))] == [("fdb_del", MAC)]
    assert plan.plan_port(w, have([((MAC, 0), None)])) == ()


def test_teardown_restores_in_safe_order():
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=10, bridge="br0", prev_learning=True, prev_flood=True)
    ops = plan.plan_port(released(rec, 2), have([((MAC, 0), static())]))
    assert kinds(ops) == [("set_flags", None, True), ("fdb_del", None, None), ("set_flags", True, None)]


def test_teardown_keeps_previous_off_flags():
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=10, bridge="br0", prev_learning=False, prev_flood=True)
    assert kinds(plan.plan_port(released(rec, 2), have([((MAC, 0), None)]))) == [("set_flags", None, True)]


def test_a_port_that_is_not_ours_any_more_gets_nothing():
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=10, bridge="br0")
    assert plan.plan_port(released(rec, 2), have(exists=False)) == ()
    assert plan.drift(want(), have(exists=False)) == ["port gone"]


def test_rollback_state_is_exactly_the_port_before():
    before = have([((MAC, 0), None)], learning=True, flood=True)
    target = plan.restore_state(want(), before)
    now = have([((MAC, 0), static())])
    assert kinds(plan.plan_port(target, now)) == [("set_flags", None, True), ("fdb_del", None, None),
                                                  ("set_flags", True, None)]


def test_render_matches_iproute2():
    ops = plan.plan_port(want(), have([((MAC, 0), None)], learning=True, flood=True), flush=True)
    assert [plan.render(o) for o in ops] == [
        "bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky",
        "bridge link set dev vnet0 learning off flood off",
        "ip link set dev vnet0 type bridge_slave fdb_flush",
    ]
    assert plan.describe(()) == "already in place"


def test_membership_and_per_vlan_entries():
    membership = plan.desired_membership(42, (100, 101))
    assert membership == ((42, True, True), (100, False, False), (101, False, False))
    assert plan.entry_vids(True, membership) == (42, 100, 101)
    assert plan.entry_vids(False, membership) == (0,)
    w = want(entries=((MAC, 42), (MAC, 100), (MAC, 101)), membership=membership)
    ops = plan.plan_port(w, have([((MAC, v), None) for v in (42, 100, 101)], learning=True, flood=True,
                                 membership=((1, True, True),)), flush=True)
    assert [plan.render(o) for o in ops] == [
        "bridge vlan add vid 42 dev vnet0 pvid untagged",
        "bridge vlan add vid 100 dev vnet0",
        "bridge vlan add vid 101 dev vnet0",
        "bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky vlan 42",
        "bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky vlan 100",
        "bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky vlan 101",
        "bridge link set dev vnet0 learning off flood off",
        "bridge vlan del vid 1 dev vnet0",
        "ip link set dev vnet0 type bridge_slave fdb_flush",
    ]


def test_healthy_vlan_port_is_healthy():
    # The status bug of the old code: only VID 0 was checked, so every port
    # of a VLAN-filtering bridge showed "static entry missing".
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=10, bridge="br0", vids=(42, 100), sticky=True)
    w = desired_from_record(rec, 2, paused=False)
    ok = have([((MAC, 42), static(vid=42)), ((MAC, 100), static(vid=100))])
    assert plan.drift(w, ok) == []
    missing = have([((MAC, 42), static(vid=42)), ((MAC, 100), None)])
    assert plan.drift(w, missing) == ["static entry for %s on VLAN 100 missing" % MAC]


def test_teardown_restores_membership_and_per_vlan_entries():
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=10, bridge="br0", vids=(42,),
                    prev_vlans=((1, True, True),), set_vlans=((42, True, True),))
    ops = plan.plan_port(released(rec, 2), have([((MAC, 42), static(vid=42))], membership=((42, True, True),)))
    assert [plan.render(o) for o in ops] == [
        "bridge vlan add vid 1 dev vnet0 pvid untagged",
        "bridge link set dev vnet0 flood on",
        "bridge fdb del 52:54:00:00:00:01 dev vnet0 master vlan 42",
        "bridge vlan del vid 42 dev vnet0",
        "bridge link set dev vnet0 learning on",
    ]
