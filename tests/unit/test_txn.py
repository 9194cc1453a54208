"""Transactions: the intent's JSON, staged writes, fault-point parsing, recovery over the fake adapter."""

import os
from dataclasses import replace

import pytest

from fdbhook import domxml, faults, txn
from fdbhook.engine import apply_domain, teardown_domain
from fdbhook.errors import StateError
from fdbhook.model import CurrentPort, DesiredPort, FdbEntry, Op
from fdbhook.plan import stages
from fdbhook.state import Store
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, config, domain_xml

XML = domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")])
COMMON = dict(port="vnet0", ifindex=11, bridge="br0", bridge_ifindex=10)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


def make_lab(tmp_path):
    k = FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1", "eth0"))
    k.links_by_index[12] = replace(k.links_by_index[12], flood=False)
    return k, Store(str(tmp_path)), config()


def flags(k):
    return {n: (k.by_name(n).learning, k.by_name(n).flood) for n in ("vnet0", "vnet1")}


ORIGINAL = {"vnet0": (True, True), "vnet1": (True, False)}


def test_port_states_round_trip_through_json():
    want = DesiredPort(entries=frozenset({("52:54:00:00:00:01", 0)}), watch=frozenset({("52:54:00:00:00:09", 5)}),
                       membership=((5, True, True), (7, False, False)), locked=True, mab=None, **COMMON)
    entry = FdbEntry(mac="52:54:00:00:00:01", ifindex=11, static=True, local=False, sticky=True, vlan=5)
    have = CurrentPort(port="vnet0", ifindex=11, exists=True, learning=True, flood=False, locked=False, mab=None,
                       entries=((("52:54:00:00:00:01", 5), entry), (("52:54:00:00:00:09", 0), None)),
                       membership=((1, True, True),))
    assert txn.desired_from_json(txn.desired_to_json(want)) == want
    assert txn.current_from_json(txn.current_to_json(have)) == have
    data = txn.intent_to_json("qemu", "t1", None, None, [(want, have)])
    assert txn.intent_from_json(data) == ("qemu", "t1", None, None, [(want, have)])
    for bad in ({}, {"format": 1}, {"format": 1, "driver": "q", "domain": "d", "ports": [{"want": 5}]}):
        with pytest.raises(ValueError):
            txn.intent_from_json(bad)


def test_entries_go_in_before_anything_depends_on_them():
    replace_op = Op(kind="fdb_replace", mac="52:54:00:00:00:01", **COMMON)
    off = Op(kind="set_flags", learning=False, flood=False, **COMMON)
    flush = Op(kind="flush", **COMMON)
    assert stages([replace_op, off, flush]) == [[replace_op], [off, flush]]
    flood_on = Op(kind="set_flags", flood=True, locked=False, **COMMON)
    delete = Op(kind="fdb_del", mac="52:54:00:00:00:01", **COMMON)
    learning_on = Op(kind="set_flags", learning=True, **COMMON)
    assert stages([flood_on, delete, learning_on]) == [[flood_on], [delete, learning_on]]
    assert stages([off]) == [[off]] and stages([]) == []


def test_the_fake_goes_on_within_a_stage_and_stops_after_it_as_the_kernel_does(tmp_path):
    k, _, _ = make_lab(tmp_path)
    bad = Op(kind="fdb_replace", mac="52:54:00:00:00:01", vlan=42, **COMMON)  # VLAN not on the port: EINVAL
    good = Op(kind="fdb_replace", mac="52:54:00:00:00:02", **COMMON)
    off = Op(kind="set_flags", learning=False, flood=False, **COMMON)
    with pytest.raises(Exception) as err:
        k.execute_many([bad, good, off])
    assert "errno 22" in str(err.value)
    assert k.fdb_get("52:54:00:00:00:02", 10) is not None  # sent in the same send: done
    assert k.by_name("vnet0").learning is True  # never sent


@pytest.mark.parametrize("value", ["", "kernel", "kernel:0", "kernel:x", "disk:3", "file:-1", "kernel:1:NOPE",
                                   "kernel:1:0", "kernel:2", "file:1:EINVAL"])
def test_malformed_fault_values_arm_nothing(value):
    armed = faults.load({"FDBHOOK_CRASH_AT": value if value.count(":") < 2 else "",
                         "FDBHOOK_FAULT_AT": value if value.count(":") == 2 else ""})
    assert armed == (value == "kernel:2")
    faults.load({})
    assert not faults.armed()


def test_fault_values_name_the_step_and_errno():
    assert faults.load({"FDBHOOK_FAULT_AT": "kernel:2:EBUSY"})
    assert faults.kernel_request() == (0, False)
    assert faults.kernel_request() == (16, False)
    faults.load({"FDBHOOK_CRASH_AT": "kernel:1"})
    assert faults.kernel_request() == (0, True)
    faults.load({})


def kill_on_port(k, port):
    real = k.execute_many

    def execute_many(ops):
        ops = list(ops)
        if ops and ops[0].port == port:
            real(stages(ops)[0])
            raise Killed()
        real(ops)
    k.execute_many = execute_many
    return real


def test_a_start_killed_half_way_is_rolled_back_by_the_next_run(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    real = kill_on_port(k, "vnet1")
    with pytest.raises(Killed):
        apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert flags(k)["vnet0"] == (False, False) and store.load("qemu", "t1") is None
    assert os.listdir(store.intent_dir())
    k.execute_many = real
    assert txn.recover(k, store) == {}
    assert flags(k) == ORIGINAL and k.entries == {} and store.load("qemu", "t1") is None
    assert os.listdir(store.intent_dir()) == []
    # the next start records the original flags as "before", not the half-changed ones
    apply_domain(domxml.parse_domain(XML), cfg, k, store)
    rec = store.load("qemu", "t1")
    assert [(n.prev_learning, n.prev_flood) for n in rec.nics] == [ORIGINAL["vnet0"], ORIGINAL["vnet1"]]


def test_a_run_killed_after_its_kernel_writes_is_finished(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    save = store.save

    def killed(record):
        raise Killed()
    store.save = killed
    with pytest.raises(Killed):
        apply_domain(domxml.parse_domain(XML), cfg, k, store)
    store.save = save
    txn.recover(k, store)
    assert [n.port for n in store.load("qemu", "t1").nics] == ["vnet0", "vnet1"]
    assert flags(k) == {"vnet0": (False, False), "vnet1": (False, False)}
    assert os.listdir(store.intent_dir()) == []


def test_every_changing_run_recovers_first(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    real = kill_on_port(k, "vnet1")
    with pytest.raises(Killed):
        apply_domain(domxml.parse_domain(XML), cfg, k, store)
    k.execute_many = real
    assert teardown_domain("qemu", "t1", k, store).results == ()  # recovered: nothing recorded, nothing to undo
    assert flags(k) == ORIGINAL and os.listdir(store.intent_dir()) == []


def test_a_failed_record_save_undoes_the_kernel_changes(tmp_path):
    k, store, cfg = make_lab(tmp_path)

    def full(record):
        raise StateError(path=store.path("qemu", "t1"), reason="No space left on device")
    store.save = full
    with pytest.raises(StateError) as err:
        apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert "No space left on device; changes undone" in str(err.value) and "\n" not in str(err.value)
    assert flags(k) == ORIGINAL and k.entries == {} and os.listdir(store.intent_dir()) == []


def test_an_intent_that_cannot_be_written_changes_nothing(tmp_path):
    k, store, cfg = make_lab(tmp_path)
    os.makedirs(os.path.join(str(tmp_path), "domains"))
    with open(store.intent_dir(), "w"):
        pass  # a file where the directory should be
    with pytest.raises(StateError):
        apply_domain(domxml.parse_domain(XML), cfg, k, store)
    assert flags(k) == ORIGINAL and k.executed == [] and store.load("qemu", "t1") is None


def test_an_unreadable_intent_is_set_aside(tmp_path):
    k, store, _ = make_lab(tmp_path)
    os.makedirs(store.intent_dir())
    with open(store.intent_path("qemu", "t1"), "w") as handle:
        handle.write("{not json")
    assert txn.recover(k, store) == {}
    assert os.listdir(store.intent_dir()) == ["qemu-t1.json.bad"]


def test_an_armed_intent_is_alive_only_while_its_process_says_so():
    import os
    import subprocess

    from fdbhook import txn

    token = txn.arm_token()
    assert token["pid"] == os.getpid() and txn.armed_alive(token)
    txn.disarmed(token)
    assert not txn.armed_alive(token)  # this process no longer awaits it
    child = subprocess.Popen(["sleep", "30"])
    try:
        other = {"pid": child.pid, "start": txn.process_start(child.pid), "nonce": "x"}
        assert txn.armed_alive(other)
        assert not txn.armed_alive(dict(other, start=other["start"] - 1))  # the pid reused by another process
    finally:
        child.kill()
        child.wait()
    assert not txn.armed_alive(other)  # gone
    for bad in (None, "x", {}, {"pid": "no"}, {"pid": None}):
        assert not txn.armed_alive(bad)
