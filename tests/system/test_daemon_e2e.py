"""fdbhookd against a real libvirtd with QEMU guests (marker ``libvirt``).

The daemon runs from the installed virtualenv (as fdbhookd.service would),
reads the test config from /etc/fdbhook/fdbhook.conf and serves the hooks
libvirtd runs over /run/fdbhook/fdbhookd.sock.
"""

import os
import subprocess
import tempfile
import threading
import time

import pytest

from tests.system import libvirt_env as E

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

FDBHOOK = "/opt/fdbhook/bin/fdbhook"
SOCKET = "/run/fdbhook/fdbhookd.sock"
DAEMON_CONF = "[daemon]\nresync_interval = 1\n"


Daemon = E.Fdbhookd


@pytest.fixture
def daemon(config):
    config.configure(extra=DAEMON_CONF)
    handle, log = tempfile.mkstemp(prefix="fdbhookd-e2e-", suffix=".log")
    os.close(handle)
    d = Daemon(log)
    d.start()
    try:
        yield d
    finally:
        d.stop()
        os.unlink(log)


def managed(dev, mac, bridge=E.BR):
    port = E.port(dev)
    return (port is not None and port["learning"] is False and port["flood"] is False
            and any(e["ifname"] == dev for e in E.static_entries(bridge, mac)))


def attach(uri, name, xml):
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as handle:
        handle.write(xml)
        path = handle.name
    try:
        return E.virsh(uri, "attach-device", name, path, "--live", timeout=120)
    finally:
        os.unlink(path)


def test_hotplug_bridge_and_network_nics(guests, daemon):
    name = guests.define("qemu", E.PFX + "-hp", [E.nic_bridge("52:54:00:e4:00:01", E.BR)])
    guests.start("qemu", name)
    assert managed(E.dev_of(E.QEMU, name, "52:54:00:e4:00:01"), "52:54:00:e4:00:01")
    attach(E.QEMU, name, E.nic_bridge("52:54:00:e4:00:02", E.BR))
    attach(E.QEMU, name, E.nic_network("52:54:00:e4:00:03", E.NET))
    br_dev = E.dev_of(E.QEMU, name, "52:54:00:e4:00:02")
    net_dev = E.dev_of(E.QEMU, name, "52:54:00:e4:00:03")
    assert E.poll(lambda: managed(br_dev, "52:54:00:e4:00:02"), timeout=5), E.port(br_dev)
    assert E.poll(lambda: managed(net_dev, "52:54:00:e4:00:03", E.NET_BR), timeout=5), E.port(net_dev)
    # The lock-down at the join put in the entry the tap predicts (fe:54:00:.. -> 52:54:00:..).
    assert E.poll(lambda: "entry 52:54:00:e4:00:02 predicted" in daemon.text(), timeout=5), daemon.text()[-3000:]
    # An admin's MAC outside libvirt's prefix is predicted wrong: the claim replaces the entry.
    attach(E.QEMU, name, E.nic_bridge("02:54:00:e4:00:04", E.BR))
    odd_dev = E.dev_of(E.QEMU, name, "02:54:00:e4:00:04")
    assert E.poll(lambda: managed(odd_dev, "02:54:00:e4:00:04"), timeout=5), E.port(odd_dev)
    assert E.poll(lambda: not E.static_entries(E.BR, "52:54:00:e4:00:04"), timeout=5)
    want = ["02:54:00:e4:00:04", "52:54:00:e4:00:01", "52:54:00:e4:00:02", "52:54:00:e4:00:03"]
    # The record is written right after the kernel changes, in the same transaction.
    assert E.poll(lambda: sorted(n["mac"] for n in E.record("qemu", name)["nics"]) == want, timeout=5)
    guests.destroy("qemu", name)
    assert E.poll(lambda: E.record("qemu", name) is None, timeout=5)


def test_suspend_removes_and_resume_restores_entries(guests, daemon):
    mac = "52:54:00:e4:01:01"
    name = guests.define("qemu", E.PFX + "-sr", [E.nic_bridge(mac, E.BR)])
    guests.start("qemu", name)
    dev = E.dev_of(E.QEMU, name, mac)
    assert managed(dev, mac)
    E.virsh(E.QEMU, "suspend", name)
    assert E.poll(lambda: not E.static_entries(E.BR, mac), timeout=5)
    assert E.port(dev)["learning"] is False and E.port(dev)["flood"] is False  # still locked down
    # The entry goes inside the record's transaction; the record file follows it.
    assert E.poll(lambda: E.record("qemu", name)["paused"] is True, timeout=5)
    time.sleep(1.5)  # a resync in between must not bring the entry back
    assert not E.static_entries(E.BR, mac)
    E.virsh(E.QEMU, "resume", name)
    assert E.poll(lambda: managed(dev, mac), timeout=5)
    assert E.poll(lambda: E.record("qemu", name)["paused"] is False, timeout=5)


def test_drift_repaired_within_one_interval(guests, daemon):
    mac = "52:54:00:e4:02:01"
    name = guests.define("qemu", E.PFX + "-dr", [E.nic_bridge(mac, E.BR)])
    guests.start("qemu", name)
    dev = E.dev_of(E.QEMU, name, mac)
    E.run("bridge", "link", "set", "dev", dev, "learning", "on")
    E.run("bridge", "fdb", "del", mac, "dev", dev, "master")
    assert E.poll(lambda: managed(dev, mac), timeout=3)  # resync_interval = 1
    assert "repaired" in daemon.text()


def test_libvirtd_restart_reconnects_and_resyncs(guests, daemon):
    mac = "52:54:00:e4:03:01"
    name = guests.define("qemu", E.PFX + "-rs", [E.nic_bridge(mac, E.BR)])
    guests.start("qemu", name)
    dev = E.dev_of(E.QEMU, name, mac)
    before = daemon.text().count("libvirt qemu:///system: connected")
    E.run(E.LIBVIRTD_UP, "restart", timeout=120)
    assert E.poll(lambda: daemon.text().count("libvirt qemu:///system: connected") > before, timeout=30)
    # Events still arrive over the new connection: suspend/resume works.
    E.virsh(E.QEMU, "suspend", name)
    assert E.poll(lambda: not E.static_entries(E.BR, mac), timeout=5)
    E.virsh(E.QEMU, "resume", name)
    assert E.poll(lambda: managed(dev, mac), timeout=5)


def test_hooks_work_when_the_daemon_is_killed(guests, daemon):
    mac = "52:54:00:e4:04:01"
    daemon.stop(kill=True)  # the socket file stays behind, nobody answers
    assert os.path.exists(SOCKET)
    name = guests.define("qemu", E.PFX + "-dk", [E.nic_bridge(mac, E.BR)])
    guests.start("qemu", name)
    dev = E.dev_of(E.QEMU, name, mac)
    assert managed(dev, mac)
    guests.destroy("qemu", name)
    assert E.record("qemu", name) is None and not E.static_entries(E.BR, mac)


def test_burst_of_20_hotplugs_across_4_guests(guests, daemon):
    names = [guests.define("qemu", E.PFX + "-b%d" % g, []) for g in range(4)]
    for name in names:
        guests.start("qemu", name)
    macs = {name: ["52:54:00:e4:1%d:%02x" % (g, i) for i in range(5)] for g, name in enumerate(names)}
    errors = []

    def plug(name):
        try:
            for mac in macs[name]:
                attach(E.QEMU, name, E.nic_bridge(mac, E.BR))
        except AssertionError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=plug, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors

    def all_managed():
        return all(managed(E.dev_of(E.QEMU, name, mac), mac) for name in names for mac in macs[name])

    assert E.poll(all_managed, timeout=15)
    assert E.poll(lambda: all(len(E.record("qemu", name)["nics"]) == 5 for name in names), timeout=5)


def test_lxc_hotplug_and_unplug(guests, daemon, lxc_ok):
    """LXC attach/detach complete without a guest OS; libvirt sends no DEVICE_REMOVED for them."""
    first, second = "52:54:00:e4:05:01", "52:54:00:e4:05:02"
    name = guests.define("lxc", E.PFX + "-lx", [E.nic_bridge(first, E.BR, driver="lxc")])
    guests.start("lxc", name)
    nic = E.nic_bridge(second, E.BR, driver="lxc")
    attach(E.LXC, name, nic)
    dev = E.dev_of(E.LXC, name, second)
    assert E.poll(lambda: managed(dev, second), timeout=5), E.port(dev)
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as handle:
        handle.write(nic)
        path = handle.name
    try:
        E.virsh(E.LXC, "detach-device", name, path, "--live", timeout=120)
    finally:
        os.unlink(path)
    assert E.poll(lambda: [n["mac"] for n in E.record("lxc", name)["nics"]] == [first], timeout=5), \
        E.record("lxc", name)
    assert not E.static_entries(E.BR, second)


def test_start_served_by_the_daemon_has_no_entry_churn(guests, daemon):
    """QEMU starts paused (-S) and the tap joins the bridge before the started hook: the link event
    fdbhookd then handles must not take the entry out until RESUMED puts it back (it used to)."""
    mac = "52:54:00:e4:05:01"
    name = guests.define("qemu", E.PFX + "-ch", [E.nic_bridge(mac, E.BR)])
    monitor = subprocess.Popen(["bridge", "monitor", "fdb"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # the monitor is listening
        guests.start("qemu", name)
        dev = E.dev_of(E.QEMU, name, mac)
        assert managed(dev, mac)
        time.sleep(2.0)  # link event, DEVICE/LIFECYCLE events and one resync have been handled
        assert managed(dev, mac)
    finally:
        monitor.terminate()
        out = monitor.communicate(timeout=10)[0]
    deleted = [line for line in out.splitlines() if line.startswith("Deleted") and mac in line]
    assert deleted == [], out
