from fdbhook import plan
from fdbhook.model import Decision, FdbEntry, Link, Nic, NicRecord, PortState

NIC = Nic(index=0, type="bridge", mac="52:54:00:00:00:01")
D = Decision(nic=NIC, action="manage", reason="t", port="vnet0", ifindex=10, bridge="br0", bridge_ifindex=2)


def kinds(ops):
    return [(o.kind, o.learning, o.flood) for o in ops]


def test_apply_order_entry_first_then_flags_then_flush():
    ops = plan.plan_apply(D, PortState(learning=True, flood=True), {None: None}, sticky=True, first_time=True)
    assert kinds(ops) == [("fdb_replace", None, None), ("set_flags", False, False), ("flush", None, None)]
    assert ops[0].sticky and ops[0].mac == NIC.mac


def test_apply_is_empty_when_in_place():
    entry = FdbEntry(mac=NIC.mac, ifindex=10, static=True, local=False, sticky=True)
    assert plan.plan_apply(D, PortState(False, False), {None: entry}, sticky=True, first_time=False) == ()


def test_apply_heals_only_drift():
    entry = FdbEntry(mac=NIC.mac, ifindex=10, static=True, local=False, sticky=True)
    ops = plan.plan_apply(D, PortState(True, False), {None: entry}, sticky=True, first_time=False)
    assert kinds(ops) == [("set_flags", False, None), ("flush", None, None)]


def test_dynamic_entry_elsewhere_is_replaced():
    entry = FdbEntry(mac=NIC.mac, ifindex=99, static=False, local=False)
    assert plan.entry_conflict("vnet0", 10, NIC.mac, entry, owned=False) is None
    assert plan.plan_apply(D, PortState(False, False), {None: entry}, True, False)[0].kind == "fdb_replace"


def test_static_or_local_entry_elsewhere_is_a_conflict():
    for entry in (FdbEntry(mac=NIC.mac, ifindex=99, static=True, local=False),
                  FdbEntry(mac=NIC.mac, ifindex=99, static=False, local=True)):
        assert "not ours" in plan.entry_conflict("vnet0", 10, NIC.mac, entry, owned=False)


def test_teardown_restores_in_safe_order():
    rec = NicRecord(mac=NIC.mac, port="vnet0", ifindex=10, bridge="br0", prev_learning=True, prev_flood=True)
    link = Link(name="vnet0", ifindex=10, master=2, is_bridge_port=True, learning=False, flood=False)
    br = Link(name="br0", ifindex=2, kind="bridge")
    entry = FdbEntry(mac=NIC.mac, ifindex=10, static=True, local=False)
    ops = plan.plan_teardown(rec, link, br, {None: entry})
    assert kinds(ops) == [("set_flags", None, True), ("fdb_del", None, None), ("set_flags", True, None)]


def test_teardown_keeps_previous_off_flags():
    rec = NicRecord(mac=NIC.mac, port="vnet0", ifindex=10, bridge="br0", prev_learning=False, prev_flood=True)
    link = Link(name="vnet0", ifindex=10, master=2, is_bridge_port=True, learning=False, flood=False)
    br = Link(name="br0", ifindex=2, kind="bridge")
    assert kinds(plan.plan_teardown(rec, link, br, {None: None})) == [("set_flags", None, True)]


def test_teardown_leaves_foreign_ports_alone():
    rec = NicRecord(mac=NIC.mac, port="vnet0", ifindex=10, bridge="br0")
    br = Link(name="br0", ifindex=2, kind="bridge")
    other_br = Link(name="br1", ifindex=3, kind="bridge")
    reused = Link(name="vnet0", ifindex=77, master=2, is_bridge_port=True)
    moved = Link(name="vnet0", ifindex=10, master=3, is_bridge_port=True)
    assert plan.plan_teardown(rec, None, None, {}) == ()
    assert plan.plan_teardown(rec, reused, br, {}) == ()
    assert plan.plan_teardown(rec, moved, other_br, {}) == ()


def test_render_matches_iproute2():
    ops = plan.plan_apply(D, PortState(True, True), {None: None}, sticky=True, first_time=True)
    assert [plan.render(o) for o in ops] == [
        "bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky",
        "bridge link set dev vnet0 learning off flood off",
        "ip link set dev vnet0 type bridge_slave fdb_flush",
    ]
    assert plan.describe(()) == "already in place"


def test_membership_and_per_vlan_entries():
    want = plan.desired_membership(42, (100, 101))
    assert want == ((42, True, True), (100, False, False), (101, False, False))
    assert plan.entry_vids(True, want) == (42, 100, 101)
    assert plan.entry_vids(False, want) == (None,)
    ops = plan.plan_apply(D, PortState(True, True), {42: None, 100: None, 101: None}, True, True,
                          membership=want, have_membership=((1, True, True),))
    assert [plan.render(o) for o in ops[:6]] == [
        "bridge vlan add vid 42 dev vnet0 pvid untagged",
        "bridge vlan add vid 100 dev vnet0",
        "bridge vlan add vid 101 dev vnet0",
        "bridge vlan del vid 1 dev vnet0",
        "bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky vlan 42",
        "bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky vlan 100",
    ]


def test_teardown_restores_membership_and_per_vlan_entries():
    rec = NicRecord(mac=NIC.mac, port="vnet0", ifindex=10, bridge="br0", vids=(42,),
                    prev_vlans=((1, True, True),), set_vlans=((42, True, True),))
    link = Link(name="vnet0", ifindex=10, master=2, is_bridge_port=True, learning=False, flood=False)
    br = Link(name="br0", ifindex=2, kind="bridge")
    entry = FdbEntry(mac=NIC.mac, ifindex=10, static=True, local=False, vlan=42)
    assert [plan.render(o) for o in plan.plan_teardown(rec, link, br, {42: entry})] == [
        "bridge link set dev vnet0 flood on",
        "bridge fdb del 52:54:00:00:00:01 dev vnet0 master vlan 42",
        "bridge vlan add vid 1 dev vnet0 pvid untagged",
        "bridge vlan del vid 42 dev vnet0",
        "bridge link set dev vnet0 learning on",
    ]
