"""A real guest OS under libvirt with fdbhook's hooks and fdbhookd (marker ``libvirt``).

One guest per module (tests/guestos.py: Debian's kernel, a busybox
initramfs, virtio_net) with two NICs on the managed bridge: net0
(trustGuestRxFilters='yes') and net1 (trust 'no'). A station - a veth whose
far end sits in a network namespace this module creates - sends and counts
raw 0x88B5 frames; the guest counts and sends its own through its command
channel. The tests run in file order on that one guest: traffic, suspend and
resume, the MAC changes (libvirt >= 11.2 only: NIC_MAC_CHANGE), detach, and
what fdbhookd left in libvirtd's log.
"""

import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from fdbhook import lab
from tests import guestos
from tests.system import libvirt_env as E

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

FDBHOOK = "/opt/fdbhook/bin/fdbhook"
NAME = E.PFX + "-gos"
MAC0 = "52:54:00:fb:00:01"  # net0, trustGuestRxFilters='yes'
MAC1 = "52:54:00:fb:00:02"  # net1, trust 'no'
NEW0 = "52:54:00:fb:10:01"
NEW1 = "52:54:00:fb:10:02"
ST_NS = "fxb-gos-st"
ST_PORT, ST_PEER = "fxb-gos-st0", "fxb-gos-st1"  # ST_PORT is a port of E.BR, ST_PEER in ST_NS
ST_MAC = "02:fb:00:00:00:01"
N = 20
RUN_DIR = "/run/fdbhook-tests/" + NAME
LIBVIRTD_LOG = "/var/log/libvirt/libvirtd.log"


def libvirt_version():
    """The daemon's version as a tuple (``virsh version --daemon``: 'Running against daemon: 11.3.0')."""
    out = E.virsh(E.QEMU, "version", "--daemon").stdout
    m = re.search(r"Running against daemon:\s+(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def need_mac_events():
    version = libvirt_version()
    if version < (11, 2, 0):
        pytest.skip("libvirt %s has no NIC_MAC_CHANGE (guest MAC changes are reported from 11.2 on; "
                    "the Debian 13 tier runs this)" % ".".join(map(str, version)))


class Station:
    """A raw-frame endpoint on the managed bridge (veth peer in our own network namespace)."""

    def __init__(self):
        E.run("ip", "netns", "add", ST_NS)
        E.run("ip", "link", "add", ST_PORT, "type", "veth", "peer", "name", ST_PEER, "netns", ST_NS)
        E.run("ip", "-n", ST_NS, "link", "set", ST_PEER, "address", ST_MAC)
        # No IPv6 on either end (no DAD, MLD or router solicitations on the bridge); /proc, not
        # sysctl(8): minimal systems have no procps.
        with open(E.sysctl_path("net.ipv6.conf.%s.disable_ipv6" % ST_PORT), "w") as handle:
            handle.write("1")
        E.run("ip", "netns", "exec", ST_NS, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6")
        E.run("ip", "link", "set", ST_PORT, "master", E.BR)
        E.run("ip", "link", "set", ST_PORT, "up")
        E.run("ip", "-n", ST_NS, "link", "set", ST_PEER, "up")
        with lab.in_netns(ST_NS):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(lab.ETH_P_EXPERIMENTAL))
            sock.bind((ST_PEER, lab.ETH_P_EXPERIMENTAL))
            sock.setblocking(False)
        self.end = lab.Endpoint(ST_PEER, ST_NS, sock=sock)

    def send(self, dst, marker, n=N):
        for _ in range(n):
            self.end.send(lab.make_frame(dst, ST_MAC, marker.encode() + b"\0"))

    def received(self, marker, src=None, timeout=0.5):
        frames = self.end.recv_frames(timeout=timeout)
        if src is not None:
            frames = [f for f in frames if lab.parse_frame(f)[1] == src]
        return lab.count_marked(frames, marker.encode())

    def close(self):
        self.end.close()
        E.run("ip", "link", "del", ST_PORT, check=False)
        E.run("ip", "netns", "del", ST_NS, check=False)


Fdbhookd = E.Fdbhookd


def log_size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


class FdbMonitor:
    """``bridge monitor fdb`` in the background: every change to the bridge's FDB, in order."""

    def __init__(self):
        self.proc = subprocess.Popen(["bridge", "monitor", "fdb"], stdout=subprocess.PIPE, text=True,
                                     env=E.CLEAN_ENV)
        self.lines = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        time.sleep(0.2)  # the netlink socket is subscribed once the process runs

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.strip()))

    def stop(self):
        time.sleep(0.2)
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.thread.join(timeout=5)
        return self.lines

    def about(self, mac):
        return [line for _, line in self.lines if mac in line and E.BR in line]


class FlagSampler:
    """Reads a port's learning and unicast_flood from sysfs as fast as it can, until stopped."""

    def __init__(self, dev):
        self.dev = dev
        self.samples = 0
        self.bad = []  # (time, learning, flood) with either on
        self.stop_ = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        base = "/sys/class/net/%s/brport/" % self.dev
        while not self.stop_.is_set():
            try:
                with open(base + "learning") as a, open(base + "unicast_flood") as b:
                    learning, flood = a.read().strip(), b.read().strip()
            except OSError:
                continue
            self.samples += 1
            if learning != "0" or flood != "0":
                self.bad.append((time.time(), learning, flood))

    def stop(self):
        self.stop_.set()
        self.thread.join(timeout=5)
        return self.samples, self.bad


def status_json():
    proc = E.run(FDBHOOK, "status", "--json", check=False)
    return proc.returncode, json.loads(proc.stdout)


def status_port(data, dev):
    for bridge in data["bridges"]:
        for port in bridge["ports"]:
            if port["name"] == dev:
                return port
    return None


def entries_on(dev, mac):
    return [e for e in E.static_entries(E.BR, mac) if e.get("ifname") == dev]


def managed(dev, mac):
    port = E.port(dev)
    return port is not None and port["learning"] is False and port["flood"] is False and bool(entries_on(dev, mac))


# --- module fixtures -----------------------------------------------------------------

@pytest.fixture(scope="module")
def env(lv):
    """Station, fdbhookd and the booted guest, shared by the module's tests."""
    lv.configure(extra="[daemon]\nresync_interval = 1\n")
    img = guestos.image()
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    os.makedirs(RUN_DIR)
    handle, dlog = tempfile.mkstemp(prefix="fdbhookd-gos-", suffix=".log")
    os.close(handle)
    libvirtd_log_start = log_size(LIBVIRTD_LOG)
    station = daemon = control = None
    try:
        station = Station()
        daemon = Fdbhookd(dlog).start()
        console = os.path.join(RUN_DIR, "console.log")
        xml = guestos.domain_xml(NAME, [guestos.nic_xml(MAC0, bridge=E.BR, trust=True),
                                        guestos.nic_xml(MAC1, bridge=E.BR)],
                                 console, os.path.join(RUN_DIR, "control.sock"), img=img)
        path = os.path.join(RUN_DIR, "domain.xml")
        with open(path, "w") as handle:
            handle.write(xml)
        E.virsh(E.QEMU, "define", path)
        monitor = FdbMonitor()
        E.virsh(E.QEMU, "start", NAME, timeout=120)
        control = guestos.Control(os.path.join(RUN_DIR, "control.sock"))
        control.wait_ready(timeout=120)
        start_fdb = monitor.stop()
        devs = {mac: E.dev_of(E.QEMU, NAME, mac) for mac in (MAC0, MAC1)}
        yield {"station": station, "daemon": daemon, "control": control, "devs": devs, "console": console,
               "start_fdb": start_fdb, "libvirtd_log_start": libvirtd_log_start}
    finally:
        if control is not None:
            control.close()
        E.virsh(E.QEMU, "destroy", NAME, check=False, timeout=120)
        E.virsh(E.QEMU, "undefine", NAME, check=False)
        if daemon is not None:
            daemon.stop()
        if station is not None:
            station.close()
        os.unlink(dlog)
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        lv.configure()


# --- tests, in order ------------------------------------------------------------------

def test_no_entry_churn_at_start(env):
    """The start hook adds each entry once; nothing removes it while QEMU waits paused (-S) to run."""
    for mac in (MAC0, MAC1):
        lines = [line for _, line in env["start_fdb"] if mac in line and E.BR in line]
        assert not [line for line in lines if line.startswith("Deleted")], lines
        assert len([line for line in lines if "static" in line]) == 1, lines
        assert managed(env["devs"][mac], mac)


def test_traffic_both_directions(env):
    st, guest = env["station"], env["control"]
    st.end.drain()
    st.send(MAC0, "fxbT0")
    st.send(MAC1, "fxbT1")
    assert E.poll(lambda: guest.received("eth0", "fxbT0") == N, timeout=10), guest.counts("eth0")
    assert E.poll(lambda: guest.received("eth1", "fxbT1") == N, timeout=10), guest.counts("eth1")
    guest.send("eth0", ST_MAC, N, "fxbG0")
    guest.send("eth1", ST_MAC, N, "fxbG1")
    frames = st.end.recv_frames(timeout=1.0)
    assert lab.count_marked(frames, b"fxbG0") == N
    assert lab.count_marked(frames, b"fxbG1") == N
    # The guest answers a PING for its MAC from the MAC it uses.
    st.send(MAC0, "PING-fxb0", n=5)
    assert st.received("PONG-fxb0", src=MAC0, timeout=1.0) == 5
    # Unknown unicast from the station does not reach the guest (its ports do not flood).
    st.send("02:fb:00:00:00:99", "fxbU0")
    time.sleep(0.5)
    assert guest.counts("eth0").get(("fxbU0", "otherhost"), 0) == 0


def test_suspend_and_resume_counted_on_both_sides(env):
    st, guest, dev = env["station"], env["control"], env["devs"][MAC0]
    E.virsh(E.QEMU, "suspend", NAME)
    assert E.poll(lambda: not E.static_entries(E.BR, MAC0) and not E.static_entries(E.BR, MAC1), timeout=5), \
        (E.fdb(E.BR), env["daemon"].text()[-3000:])
    assert E.port(dev)["learning"] is False and E.port(dev)["flood"] is False  # still locked down
    st.send(MAC0, "fxbP0")
    E.virsh(E.QEMU, "resume", NAME)
    assert E.poll(lambda: managed(dev, MAC0) and managed(env["devs"][MAC1], MAC1), timeout=5)
    st.end.drain()
    st.send(MAC0, "fxbR0")
    assert E.poll(lambda: guest.received("eth0", "fxbR0") == N, timeout=10), guest.counts("eth0")
    # What was sent while the guest was paused (no entry, no flood) never reached it.
    assert guest.received("eth0", "fxbP0") == 0
    guest.send("eth0", ST_MAC, N, "fxbQ0")
    assert st.received("fxbQ0", src=MAC0, timeout=1.0) == N


def test_untrusted_mac_change_keeps_configured_mac(env):
    """trustGuestRxFilters='no': libvirt reports nothing, the configured MAC keeps its entry."""
    need_mac_events()
    st, guest, dev, daemon = env["station"], env["control"], env["devs"][MAC1], env["daemon"]
    before = daemon.text()
    libvirtd_log = log_size(LIBVIRTD_LOG)
    guest.set_mac("eth1", NEW1)
    try:
        time.sleep(2.0)  # several resync intervals: nothing may move
        assert managed(dev, MAC1)
        assert not E.static_entries(E.BR, NEW1)
        assert "currentAddress" not in E.virsh(E.QEMU, "dumpxml", NAME).stdout.split(MAC1)[1][:80]
        assert "guest changed" not in daemon.text()[len(before):]  # no NIC_MAC_CHANGE
        if libvirtd_log is not None:  # and libvirtd logs nothing about it at its default verbosity
            with open(LIBVIRTD_LOG, encoding="utf-8", errors="replace") as handle:
                handle.seek(libvirtd_log)
                assert not [line for line in handle if NEW1 in line or "rx" in line.lower()]
        st.send(NEW1, "fxbX1")
        time.sleep(0.5)
        # The guest gets no unicast for the MAC it set: no entry, and its port does not flood.
        assert guest.received("eth1", "fxbX1") == 0
        code, data = status_json()
        assert code == 0 and status_port(data, dev)["mac"] == MAC1
    finally:
        guest.set_mac("eth1", MAC1)


def test_trusted_mac_change_followed_on_the_same_port(env):
    need_mac_events()
    st, guest, dev, daemon = env["station"], env["control"], env["devs"][MAC0], env["daemon"]
    sticky = ["sticky" in e.get("flags", []) for e in entries_on(dev, MAC0)]
    monitor = FdbMonitor()
    sampler = FlagSampler(dev)
    t0, t1 = guest.set_mac("eth0", NEW0)
    moved = E.poll(lambda: entries_on(dev, NEW0) and not E.static_entries(E.BR, MAC0), timeout=5, interval=0.01)
    samples, bad = sampler.stop()
    fdb_lines = monitor.stop()
    assert moved, (E.fdb(E.BR), daemon.text()[-2000:])
    assert samples > 100 and not bad, (samples, bad[:5])
    new_at = [i for i, (_, line) in enumerate(fdb_lines) if NEW0 in line and not line.startswith("Deleted")]
    old_gone = [i for i, (_, line) in enumerate(fdb_lines) if MAC0 in line and line.startswith("Deleted")]
    assert new_at and old_gone and new_at[0] < old_gone[0], fdb_lines  # new entry first, then the old one out
    assert E.port(dev)["learning"] is False and E.port(dev)["flood"] is False
    assert ["sticky" in e.get("flags", []) for e in entries_on(dev, NEW0)] == sticky == [True]  # as configured
    # The guest's console timestamps the change (what bench/guest_mac.py measures from).
    def console_stamp():
        m = re.search(r"FXB mac eth0 %s ([0-9.]+) ([0-9.]+)" % NEW0, guestos.console_text(env["console"]))
        return m and abs(float(m.group(1)) - t0) < 1e-5
    assert E.poll(console_stamp, timeout=5), guestos.console_text(env["console"])[-1000:]
    rec = E.record("qemu", NAME)
    nic = next(n for n in rec["nics"] if n["port"] == dev)
    assert nic["mac"] == NEW0 and nic.get("config_mac") == MAC0, rec
    # Frames to the new MAC reach the guest, and it answers from it.
    st.send(NEW0, "fxbM0")
    assert E.poll(lambda: guest.received("eth0", "fxbM0") == N, timeout=10), guest.counts("eth0")
    st.end.drain()
    st.send(NEW0, "PING-fxbm", n=5)
    assert st.received("PONG-fxbm", src=NEW0, timeout=1.0) == 5
    code, data = status_json()
    port = status_port(data, dev)
    assert code == 0 and not port["drift"] and port["static_entry"], port
    assert port["mac"] == NEW0 and port["configured_mac"] == MAC0
    # Later resyncs and full syncs (every second here), the reconnect hook
    # without the daemon, and a real libvirtd restart (reconnect hook through
    # the daemon, the daemon's own reconnect and full sync) keep it.
    time.sleep(2.5)
    hook = E.hook_targets()["qemu"]
    xml = E.virsh(E.QEMU, "dumpxml", NAME).stdout
    assert "currentAddress='%s'" % NEW0 in xml
    proc = subprocess.run([hook, NAME, "reconnect", "begin", "-"], input=xml, capture_output=True, text=True,
                          env=dict(E.CLEAN_ENV, FDBHOOK_NO_DAEMON="1"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    connects = daemon.text().count("libvirt qemu:///system: connected")
    sampler = FlagSampler(dev)
    E.run(E.LIBVIRTD_UP, "restart", timeout=120)
    assert E.poll(lambda: daemon.text().count("libvirt qemu:///system: connected") > connects, timeout=30)
    time.sleep(2.5)  # the sync after reconnecting, and resyncs
    samples, bad = sampler.stop()
    assert not bad, bad[:5]
    assert entries_on(dev, NEW0) and not E.static_entries(E.BR, MAC0), E.fdb(E.BR)
    assert E.port(dev)["learning"] is False and E.port(dev)["flood"] is False
    assert status_json()[0] == 0
    # And back to the configured MAC: followed the same way.
    guest.set_mac("eth0", MAC0)
    assert E.poll(lambda: entries_on(dev, MAC0) and not E.static_entries(E.BR, NEW0), timeout=5)
    assert E.poll(lambda: [(n["mac"], n.get("config_mac")) for n in E.record("qemu", NAME)["nics"]
                           if n["port"] == dev] == [(MAC0, None)], timeout=5), E.record("qemu", NAME)


def test_mac_change_while_fdbhookd_is_down_followed_by_the_hooks_and_its_sync(env):
    """currentAddress in the live XML is the truth wherever it is read: a reconnect hook, the daemon's first sync."""
    need_mac_events()
    guest, dev, daemon = env["control"], env["devs"][MAC0], env["daemon"]
    daemon.stop()
    try:
        guest.set_mac("eth0", NEW0)
        assert E.poll(lambda: "currentAddress='%s'" % NEW0 in E.virsh(E.QEMU, "dumpxml", NAME).stdout, timeout=5)
        time.sleep(0.5)
        assert entries_on(dev, MAC0) and not E.static_entries(E.BR, NEW0)  # nobody follows it now
        assert status_port(status_json()[1], dev)["guest_mac_change"] == "no daemon"
        xml = E.virsh(E.QEMU, "dumpxml", NAME).stdout
        proc = subprocess.run([E.hook_targets()["qemu"], NAME, "reconnect", "begin", "-"], input=xml,
                              capture_output=True, text=True, env=E.CLEAN_ENV, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert entries_on(dev, NEW0) and not E.static_entries(E.BR, MAC0), E.fdb(E.BR)
        assert E.port(dev)["learning"] is False and E.port(dev)["flood"] is False
        guest.set_mac("eth0", MAC0)
        time.sleep(0.5)
        assert entries_on(dev, NEW0)  # still nobody follows
    finally:
        daemon.start()
    # The daemon's sync after connecting reads the live XML: back to the configured MAC.
    assert E.poll(lambda: entries_on(dev, MAC0) and not E.static_entries(E.BR, NEW0), timeout=10), E.fdb(E.BR)
    assert managed(dev, MAC0)


def test_trusted_guest_cannot_take_another_nics_mac(env):
    """A guest that sets a MAC another managed NIC holds gets nothing, and nothing fails over it.

    The owner (here the guest's own net1) keeps its entry; net0's port keeps
    its configured MAC. A reconnect hook must still exit 0: libvirt kills a
    guest whose reconnect hook fails.
    """
    need_mac_events()
    guest, dev0, dev1, daemon = env["control"], env["devs"][MAC0], env["devs"][MAC1], env["daemon"]
    before = daemon.text()
    guest.set_mac("eth0", MAC1)
    try:
        assert E.poll(lambda: "guest changed net0 MAC %s -> %s" % (MAC0, MAC1) in daemon.text()[len(before):],
                      timeout=5)
        time.sleep(2.0)  # the MAC change job, resyncs and syncs
        assert [e["ifname"] for e in E.static_entries(E.BR, MAC1)] == [dev1], E.fdb(E.BR)
        assert managed(dev0, MAC0) and managed(dev1, MAC1)
        log = daemon.text()[len(before):]
        assert "FAILED" not in log, log
        assert log.count("the MAC the guest set itself is not followed") == 1, log  # said once
        xml = E.virsh(E.QEMU, "dumpxml", NAME).stdout
        assert "currentAddress='%s'" % MAC1 in xml
        for extra in ({}, {"FDBHOOK_NO_DAEMON": "1"}):
            proc = subprocess.run([E.hook_targets()["qemu"], NAME, "reconnect", "begin", "-"], input=xml,
                                  capture_output=True, text=True, env=dict(E.CLEAN_ENV, **extra), timeout=60)
            assert proc.returncode == 0, (extra, proc.stderr)
        assert [e["ifname"] for e in E.static_entries(E.BR, MAC1)] == [dev1], E.fdb(E.BR)
        assert status_json()[0] == 0
    finally:
        guest.set_mac("eth0", MAC0)
    assert E.poll(lambda: managed(dev0, MAC0) and managed(dev1, MAC1), timeout=10), E.fdb(E.BR)


def test_status_says_what_a_guest_mac_change_does(env):
    """Per NIC: followed (trust 'yes', libvirt >= 11.2, fdbhookd) or why not, in plain words."""
    from fdbhook import virt
    code, data = status_json()
    assert code == 0
    events = libvirt_version() >= (11, 2, 0) and virt.version_facts()["nic_mac_change_event"]
    assert status_port(data, env["devs"][MAC0])["guest_mac_change"] == ("followed" if events else "no event")
    assert status_port(data, env["devs"][MAC1])["guest_mac_change"] == "not trusted"
    text = E.run(FDBHOOK, "status").stdout
    assert "NOT followed (trustGuestRxFilters='no'): if the guest sets another MAC it gets no unicast" in text
    assert "libvirt reports nothing" in text


def test_detach_completes_and_daemon_removes_the_nic(env):
    """The guest OS acknowledges the unplug (acpiphp); fdbhookd drops the NIC's record, port and entry go."""
    guest, dev = env["control"], env["devs"][MAC1]
    path = os.path.join(RUN_DIR, "detach.xml")
    with open(path, "w") as handle:
        handle.write(guestos.nic_xml(MAC1, bridge=E.BR))
    E.virsh(E.QEMU, "detach-device", NAME, path, "--live", timeout=60)
    assert E.poll(lambda: all(n["mac"] != MAC1 for n in E.live_nics(E.QEMU, NAME)), timeout=30)
    assert E.poll(lambda: "eth1" not in " ".join(guest.call("links")), timeout=10)
    assert E.poll(lambda: E.link(dev) is None, timeout=10)
    assert E.poll(lambda: all(n["mac"] != MAC1 for n in E.record("qemu", NAME)["nics"]), timeout=10), \
        E.record("qemu", NAME)
    assert not E.static_entries(E.BR, MAC1)
    assert managed(env["devs"][MAC0], MAC0)  # the other NIC untouched


def run_without_lxc_driver(log, seconds=3.0):
    """fdbhookd for a few seconds where the LXC driver is not installed, as it sees it.

    Its own mount namespace gets a connection-driver directory with the QEMU
    driver only (libvirtd itself is untouched): what a host without
    libvirt-daemon-driver-lxc looks like to fdbhookd.
    """
    from fdbhook import virt
    drivers = sorted({os.path.dirname(p) for pattern in virt.DRIVER_GLOBS for p in glob.glob(pattern % "*")})
    assert drivers, "no libvirt connection drivers found"
    # mount(2) from Python: minimal systems have no mount(8) (package mount is not essential).
    script = ("import ctypes, os, sys\n"
              "libc = ctypes.CDLL(None, use_errno=True)\n"
              "for d in sys.argv[1:]:\n"
              "    if libc.mount(b'fxb', d.encode(), b'tmpfs', 0, None) != 0:\n"
              "        raise OSError(ctypes.get_errno(), 'mount tmpfs on ' + d)\n"
              "    open(os.path.join(d, 'libvirt_driver_qemu.so'), 'w').close()\n"
              "os.execv(%r, [%r, 'daemon'])\n" % (FDBHOOK, FDBHOOK))
    env = dict(E.CLEAN_ENV, FDBHOOK_LOG=log, FDBHOOK_SOCKET=os.path.join(RUN_DIR, "nolxc.sock"))
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable, "-c", script] + drivers,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        up = E.poll(lambda: Fdbhookd.CONNECTED in guestos.console_text(log) or proc.poll() is not None, timeout=20)
        assert up and proc.poll() is None, (guestos.console_text(log), proc.poll())
        time.sleep(seconds)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    return guestos.console_text(log)


def test_no_libvirtd_errors_from_fdbhookd(env):
    """fdbhookd's connections leave no error lines in libvirtd's log, also when it stops.

    Without the LXC driver it never tries lxc:///system (each try costs two
    error lines); at SIGTERM it deregisters its callbacks first, so that its
    connection really closes instead of dropping at exit ("End of file
    while reading data").
    """
    start = env["libvirtd_log_start"]
    if start is None:
        pytest.skip("libvirtd logs nowhere we can read (%s missing)" % LIBVIRTD_LOG)
    env["daemon"].stop()
    text = run_without_lxc_driver(os.path.join(RUN_DIR, "nolxc.log"))
    assert "lxc:///system: its driver is not installed here; not watched" in text
    time.sleep(0.5)
    with open(LIBVIRTD_LOG, encoding="utf-8", errors="replace") as handle:
        handle.seek(start)
        new = handle.read()
    errors = [line for line in new.splitlines() if ": error : " in line and re.search(
        r"lxc|no connection driver|End of file while reading data|Cannot recv data", line, re.I)]
    assert not errors, errors
