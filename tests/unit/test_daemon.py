"""fdbhookd's own logic without sockets or libvirt: jobs, dedupe, link events, driver detection."""

import logging

from fdbhook import daemon as D
from fdbhook import virt
from fdbhook.model import Link
from tests.fakes import FakeKernel


def make(tmp_path, text="[manage]\nbridges = br0\n"):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text(text)
    return D.Daemon(config_path=str(conf), socket_path=str(tmp_path / "sock"), use_libvirt=False)


def drain(d):
    out = []
    while not d.jobs.empty():
        out.append(d.jobs.get())
    return out


def test_jobs_are_deduplicated_but_pause_and_resume_keep_their_order(tmp_path):
    d = make(tmp_path)
    d.put(D.Reconcile("qemu:///system", "web1"))
    d.put(D.Reconcile("qemu:///system", "web1"))
    d.put(D.Pause("qemu", "web1", True))
    d.put(D.Pause("qemu", "web1", False))
    d.put(D.Pause("qemu", "web1", True))
    assert drain(d) == [D.Reconcile("qemu:///system", "web1"), D.Pause("qemu", "web1", True),
                        D.Pause("qemu", "web1", False), D.Pause("qemu", "web1", True)]


def test_libvirt_events_only_queue_typed_jobs(tmp_path):
    d = make(tmp_path)
    d.lifecycle("qemu:///system", "a", "suspended")
    d.lifecycle("lxc:///system", "b", "resumed")
    d.lifecycle("qemu:///system", "a", "started")
    d.device_added("qemu:///system", "a", "net1")
    d.device_removed("qemu:///system", "a", "net1")
    d.mac_changed("qemu:///system", "a", "net0", "52:54:00:00:00:01", "52:54:00:00:00:02")
    assert drain(d) == [D.Pause("qemu", "a", True), D.Pause("lxc", "b", False), D.Reconcile("qemu:///system", "a"),
                        D.Reconcile("qemu:///system", "a", alias="net1"),
                        D.Reconcile("qemu:///system", "a", alias="-"),
                        D.MacChange("qemu:///system", "a", "net0", "52:54:00:00:00:01", "52:54:00:00:00:02")]


def test_link_events_find_new_ports_on_managed_bridges_and_vanished_managed_ports(tmp_path):
    d = make(tmp_path)
    d._known_ports = {21}
    k = FakeKernel([Link(name="br0", ifindex=10, kind="bridge"), Link(name="brx", ifindex=11, kind="bridge")])
    events = [("del", 21, "vnet1", 0), ("del", 22, "vnet2", 0), ("new", 23, "vnet3", 10),
              ("new", 24, "vnet4", 11), ("new", 21, "vnet1", 10), ("new", 25, "eth9", 0)]
    d._link_events(k, events, {}, {})
    assert drain(d) == [D.PortGone(21), D.PortJoined("vnet3")]
    # The same port is not looked up again within 5 s.
    asked = {23: 1e12}
    d._link_events(k, [("new", 23, "vnet3", 10)], {}, asked)
    assert drain(d) == []


def test_only_a_change_of_master_is_a_join(tmp_path):
    """A flag change of a port already on the bridge (our own apply, a teardown putting it back) is no join."""
    d = make(tmp_path)
    k = FakeKernel([Link(name="br0", ifindex=10, kind="bridge")])
    masters = {23: 10}  # vnet3 was on br0 when the monitor started
    d._link_events(k, [("new", 23, "vnet3", 10), ("new", 24, "vnet4", 10)], {}, {}, None, masters)
    assert drain(d) == [D.PortJoined("vnet4")] and masters == {23: 10, 24: 10}
    d._link_events(k, [("new", 24, "vnet4", 10)], {}, {}, None, masters)  # vnet4's flags changed
    assert drain(d) == []
    d._link_events(k, [("new", 23, "vnet3", 0), ("new", 23, "vnet3", 10)], {}, {}, None, masters)  # left, rejoined
    assert drain(d) == [D.PortJoined("vnet3")]


def test_a_uri_whose_driver_is_not_installed_is_not_watched(tmp_path, monkeypatch, caplog):
    d = make(tmp_path)
    monkeypatch.setattr(virt, "start_event_loop", lambda stopping: True)
    monkeypatch.setattr(virt, "DRIVER_GLOBS", (str(tmp_path / "none-%s.so"),))
    (tmp_path / "none-qemu.so").write_text("")
    started = []
    monkeypatch.setattr(d, "_spawn", lambda name, target, *a: started.append(name))
    with caplog.at_level(logging.INFO, logger="fdbhook"):
        d._start_libvirt()
    assert list(d.watchers) == ["qemu:///system"] and started == ["libvirt qemu:///system"]
    assert "lxc:///system: its driver is not installed here; not watched" in caplog.text


def test_config_is_read_again_only_when_the_file_changes(tmp_path):
    d = make(tmp_path)
    first = d.config()
    assert d.config() is first
    (tmp_path / "fdbhook.conf").write_text("[manage]\nbridges = br1 br2\n")
    assert d.config().bridges == ("br1", "br2")


def test_a_port_carrying_a_nic_mac_from_a_hook_gets_its_plan_at_the_join_and_others_a_lookup(tmp_path, monkeypatch):
    from tests.helpers import bridge_nic, domain_xml

    monkeypatch.setenv("FDBHOOK_STATE_DIR", str(tmp_path / "state"))
    d = make(tmp_path)
    k = FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1", "eth0"))
    k.links_by_index[11] = Link(**dict(k.links_by_index[11].__dict__, mac="fe:54:00:00:00:01"))
    k.links_by_index[12] = Link(**dict(k.links_by_index[12].__dict__, mac="fe:54:00:00:00:99"))
    d.note_hook("qemu", ["web1", "prepare", "begin", "-"], domain_xml([bridge_nic(dev=None)], name="web1"))
    events = [("new", 11, "vnet0", 10), ("new", 12, "vnet1", 10), ("new", 13, "eth0", 10)]
    d._lockdown_events(k, events, {}, {})  # its own thread, on its own socket: the same events
    d._link_events(k, events, {}, {})
    assert drain(d) == [D.PortJoined("vnet1"), D.PortJoined("eth0")]  # libvirt's way for the rest
    assert k.by_name("vnet0").learning is False and k.by_name("vnet0").flood is False
    assert k.fdb_get("52:54:00:00:00:01", 10).ifindex == 11
    assert [n.port for n in d.store().load("qemu", "web1").nics] == ["vnet0"]
    assert d._known_ports == {11}
    # vnet1: a qemu tap (libvirt's name and tap address) nobody knows yet: locked down, no entry, its
    # original state pending; eth0 (no tap address) untouched
    assert k.by_name("vnet1").learning is False and k.by_name("vnet1").flood is False
    assert [(i, p["port"], p["learning"], p["flood"]) for i, p in d.store().pending()] == [(12, "vnet1", True, True)]
    assert k.by_name("eth0").learning is True and k.by_name("eth0").flood is True
    d.note_hook("qemu", ["web1", "release", "end", "-"], b"")
    assert d.known_domains() == []


def test_known_domains_libvirt_no_longer_lists_are_forgotten_unless_young(tmp_path):
    from fdbhook.model import Domain

    d = make(tmp_path)
    d.know_domain(Domain(name="a", driver="qemu"))
    d.know_domain(Domain(name="b", driver="qemu"))
    d.know_domain(Domain(name="c", driver="lxc"))
    d._forget_stopped("qemu", ["a"])
    assert len(d.known_domains()) == 3  # young: maybe mid-start
    d._forget_stopped("qemu", ["a"], now=1e12)
    assert sorted(x.name for x in d.known_domains()) == ["a", "c"]


class FakeWatcher:
    """libvirt lists the hot-plugged NIC only after a few looks (QEMU has it then)."""

    driver = "qemu"

    def __init__(self, after):
        self.looks = 0
        self.after = after

    def owners_of(self, ports):
        self.looks += 1
        return {port: "web1" for port in ports if port == "vnet5"} if self.looks >= self.after else {}


def test_a_libvirt_style_port_nothing_knows_is_looked_up_until_libvirt_lists_it(tmp_path, monkeypatch):
    d = make(tmp_path)
    k = FakeKernel.bridge_with_ports("br0", ("vnet5", "eth0"))
    k.links_by_index[11] = Link(**dict(k.links_by_index[11].__dict__, mac="fe:54:00:00:00:05"))
    d.watchers = {"qemu:///system": FakeWatcher(after=3)}
    found = []
    monkeypatch.setattr(d, "_reconcile", lambda kernel, store, config, uri, name, port=None: found.append((name, port)))
    pending = {}
    d._link_events(k, [("new", 11, "vnet5", 10), ("new", 12, "eth0", 10)], {}, {}, pending)
    assert list(pending) == [11] and drain(d) == [D.PortJoined("eth0")]  # not libvirt-style: one lookup, as before
    for _ in range(3):
        d._look_up_joined(k, pending)
    assert found == [("web1", "vnet5")] and pending == {}
    # Already managed (DEVICE_ADDED was faster) or looked for long enough: dropped without asking.
    d.watchers["qemu:///system"].looks = -100
    pending = {11: ("vnet5", 1e12), 13: ("vnet7", 0.0)}
    d._known_ports = {11}
    d._look_up_joined(k, pending)
    assert pending == {} and d.watchers["qemu:///system"].looks == -100


def test_a_failing_thread_is_restarted_and_reported(tmp_path, monkeypatch):
    """Issue 18 item 4: every fdbhookd thread survives any exception; health() says it restarted."""
    import threading

    from fdbhook.daemon import Daemon

    monkeypatch.setenv("FDBHOOK_STATE_DIR", str(tmp_path))
    daemon = Daemon(config_path=str(tmp_path / "absent.conf"), socket_path=str(tmp_path / "s"), use_libvirt=False)
    daemon.restart_pause = 0.01
    calls, done = [], threading.Event()

    def target():
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("boom %d" % len(calls))
        done.set()

    daemon._spawn("resync", target)
    assert done.wait(30)
    assert daemon.health()["threads_restarted"] == {"resync": {"count": 2, "error": "ValueError: boom 2"}}
    assert daemon.health()["config_fallback"] == ""


def test_an_expected_failure_of_a_thread_or_a_job_is_one_line_a_bug_keeps_its_traceback(tmp_path, caplog):
    from fdbhook.errors import StateError

    d = make(tmp_path)
    d.restart_pause = 0.01
    runs = []

    def target(exc):
        runs.append(exc)
        if len(runs) == 2:
            d.stopping.set()
        raise exc

    d._survive("t", target, StateError(path="/run/fdbhook/lock", reason="Read-only file system"))
    d.stopping.clear()
    runs.clear()
    d._survive("u", target, KeyError("bug"))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0].getMessage() == "thread t failed (restart 1 in 0 s): state /run/fdbhook/lock: " \
                                     "Read-only file system" and errors[0].exc_info is None
    assert errors[1].getMessage() == "thread u failed (restart 1 in 0 s)" and errors[1].exc_info is not None
    assert len(errors) == 2

    caplog.clear()
    d = make(tmp_path)
    d.run_job = lambda kernel, job: (_ for _ in ()).throw(StateError(path="/run/fdbhook/lock", reason="EROFS"))
    d.jobs.put(D.Resync())
    d.jobs.put(D.Stop())
    d._worker()
    (line,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert line.getMessage() == "job Resync() failed: state /run/fdbhook/lock: EROFS" and line.exc_info is None
