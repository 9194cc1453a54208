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
