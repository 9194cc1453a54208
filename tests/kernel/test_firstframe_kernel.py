"""An incoming guest's first frame on its port, on real taps: fdbhook.kernel.FrameSocket and fdbhookd's use of it."""

import os
import select
import socket
import time

import pytest

from fdbhook.firstframe import bpf_program
from fdbhook.kernel import FrameSocket
from fdbhook.lab import in_netns, poll
from tests.helpers import bridge_nic, domain_xml
from tests.kernel.test_daemon_kernel import daemon, denv, hook, log  # noqa: F401 (fixtures)
from tests.kernel.test_hook_kernel import pyroute2_view

pytestmark = pytest.mark.root
MAC, OTHER = "52:54:00:00:00:01", "52:54:00:00:00:77"


def frame(src, dst="ff:ff:ff:ff:ff:ff"):
    """An RARP-like broadcast (what QEMU announces a migrated guest with)."""
    return bytes.fromhex(dst.replace(":", "") + src.replace(":", "")) + b"\x80\x35" + bytes(46)


def readable(sock, seconds):
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def packet_sockets(lab, ifindex):
    """AF_PACKET sockets bound to IFINDEX in the lab namespace (/proc/net/packet)."""
    with in_netns(lab.ns), open("/proc/thread-self/net/packet") as handle:
        return sum(1 for line in handle.read().splitlines()[1:] if int(line.split()[4]) == ifindex)


def test_only_a_frame_the_guest_sends_from_a_known_mac_wakes_the_socket(lab):
    lab.add_bridge("br0")
    guest = lab.add_tap("vnet0", bridge="br0")
    wire = lab.add_veth("ff-up", "ff-upp", bridge="br0")
    with in_netns(lab.ns):
        ifindex = socket.if_nametoindex("vnet0")
        sock = FrameSocket(ifindex, bpf_program([MAC, "52:54:00:00:00:0a"]))
    try:
        assert packet_sockets(lab, ifindex) == 1
        guest.send(frame(OTHER))  # another source MAC on the guest's port
        wire.send(frame(MAC))  # the guest's MAC, flooded by the bridge TO the tap (the source still runs it)
        assert not readable(sock, 0.5) and sock.drain() == 0 and sock.received is None
        sent = time.time()
        guest.send(frame("52:54:00:00:00:0a", dst="02:00:00:00:00:09"))
        assert readable(sock, 10) and sock.drain() == 1
        assert sent - 0.01 <= sock.received <= time.time()  # the kernel's stamp of its arrival
        guest.send(frame(MAC))
        assert readable(sock, 10) and sock.drain() == 1
        lab.ip("link", "del", "vnet0")  # the port vanishes (an aborted migration): an error, not a frame
        assert readable(sock, 10)
        with pytest.raises(OSError):
            sock.drain()
    finally:
        sock.close()
    assert packet_sockets(lab, ifindex) == 0


def test_fdbhookd_puts_the_entry_in_at_the_incoming_guests_first_frame_and_closes_its_socket(lab, denv, daemon):
    lab.add_bridge("br0")
    guest = lab.add_tap("vnet0", bridge="br0")
    with in_netns(lab.ns):
        ifindex = socket.if_nametoindex("vnet0")
    xml = domain_xml([bridge_nic()])
    for op in ("migrate", "start"):
        result = hook(lab, denv, op, xml)
        assert result.returncode == 0, result.stderr
    assert pyroute2_view(lab, "vnet0") == (False, False, [])  # locked down, no entry: the guest is paused
    assert poll(lambda: packet_sockets(lab, ifindex) == 1, timeout=10), log(denv)
    guest.send(frame(OTHER))
    assert not poll(lambda: pyroute2_view(lab, "vnet0")[2], timeout=1)
    guest.send(frame(MAC))
    assert poll(lambda: pyroute2_view(lab, "vnet0") == (False, False, [MAC]), timeout=10), log(denv)
    # the log line follows the transaction that put the entry in: wait for it, not only for the entry
    assert poll(lambda: "qemu/t1: first frame of the incoming guest on vnet0: entries in before RESUMED, "
                in log(denv), timeout=10), log(denv)
    assert poll(lambda: packet_sockets(lab, ifindex) == 0, timeout=10)
    # later frames change nothing; the stopped hook tears down as ever
    guest.send(frame(MAC))
    assert hook(lab, denv, "stopped").returncode == 0
    assert pyroute2_view(lab, "vnet0") == (True, True, [])
    assert log(denv).count("first frame of the incoming guest") == 1
    # the resume was planned and its intent written before the frame: only the kernel write was left
    assert "entries in before RESUMED" in log(denv) and "; planned ahead, kernel written after " in log(denv), log(denv)
    assert "interrupted operation" not in log(denv)
    # the watch thread, and it alone, at SCHED_FIFO 1 (root here: CAP_SYS_NICE; under the unit RLIMIT_RTPRIO 1)
    policies = []
    for task in os.listdir("/proc/%d/task" % daemon.pid):
        with open("/proc/%d/task/%s/stat" % (daemon.pid, task)) as handle:
            policies.append(handle.read().rsplit(")", 1)[-1].split()[37:39])  # rt_priority, policy
    assert policies.count(["1", "1"]) == 1 and all(p in (["0", "0"], ["1", "1"]) for p in policies), policies


def incoming_guest(lab, denv):
    """vnet0 on br0, its guest t1 incoming (the migrate and start hooks ran): (vnet0's ifindex, the XML, the
    tap's endpoint)."""
    lab.add_bridge("br0")
    guest = lab.add_tap("vnet0", bridge="br0")
    with in_netns(lab.ns):
        ifindex = socket.if_nametoindex("vnet0")
    xml = domain_xml([bridge_nic()])
    for op in ("migrate", "start"):
        assert hook(lab, denv, op, xml).returncode == 0
    return ifindex, xml, guest


def test_fdbhookd_stops_watching_a_port_whose_incoming_guest_is_gone(lab, denv, daemon):
    ifindex, _, _ = incoming_guest(lab, denv)
    assert poll(lambda: packet_sockets(lab, ifindex) == 1, timeout=10), log(denv)
    assert hook(lab, denv, "stopped").returncode == 0  # the migration was aborted: libvirt stops the guest
    assert poll(lambda: packet_sockets(lab, ifindex) == 0, timeout=10), log(denv)


def _intents(denv):
    import json
    import os

    path = os.path.join(denv["FDBHOOK_STATE_DIR"], "intents")
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    return [json.load(open(os.path.join(path, n))) for n in names if n.endswith(".json")]


def test_an_armed_resume_outlives_other_runs_and_a_killed_fdbhookd_leaves_the_guest_paused(lab, denv, daemon):
    """The intent written ahead: other runs' recovery leaves it while fdbhookd lives; once fdbhookd is
    killed the next run drops it (rolled back: nothing was written) and the port stays locked, no entry."""
    import subprocess
    import sys

    ifindex, xml, _ = incoming_guest(lab, denv)
    assert poll(lambda: packet_sockets(lab, ifindex) == 1 and _intents(denv), timeout=10), log(denv)
    intent = _intents(denv)[0]
    assert intent["armed"]["pid"] == daemon.pid and intent["domain"] == "t1"
    # another process's run recovers first: fdbhookd is alive, the armed intent stays
    status = subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "status"]), env=denv,
                            capture_output=True, timeout=60)
    assert status.returncode in (0, 1), status.stderr
    assert b"no entry yet (incoming migration: it goes in at the guest's first frame, planned ahead)" \
        in status.stdout, status.stdout
    assert _intents(denv) == [intent] and "interrupted operation" not in log(denv)
    daemon.kill()
    daemon.wait(timeout=10)
    assert hook(lab, denv, "started", xml).returncode == 0  # the next run, without fdbhookd
    assert _intents(denv) == []
    assert "qemu/t1: an interrupted operation was rolled back (1 ports)" in log(denv)
    assert pyroute2_view(lab, "vnet0") == (False, False, [])  # still paused: locked down, no entry


def test_a_record_changed_after_the_arming_is_planned_again(lab, denv, daemon):
    import os

    lab.add_bridge("br0")
    guest = lab.add_tap("vnet0", bridge="br0")
    xml = domain_xml([bridge_nic()])
    for op in ("migrate", "start"):
        assert hook(lab, denv, op, xml).returncode == 0
    assert poll(lambda: "qemu/t1: resume planned ahead" in log(denv), timeout=10), log(denv)
    record = os.path.join(denv["FDBHOOK_STATE_DIR"], "domains", "qemu-t1.json")
    before = os.stat(record).st_ino
    os.rename(record, record + ".x")  # the record rewritten (as an apply that changes it does)
    os.rename(record + ".x", record)
    with open(record + ".y", "wb") as out, open(record, "rb") as src:
        out.write(src.read())
    os.rename(record + ".y", record)
    assert os.stat(record).st_ino != before
    assert hook(lab, denv, "started", xml).returncode == 0  # any hook wakes fdbhookd's threads
    assert poll(lambda: log(denv).count("qemu/t1: resume planned ahead") == 2, timeout=10), log(denv)
    assert len(_intents(denv)) == 1
    guest.send(frame(MAC))
    assert poll(lambda: pyroute2_view(lab, "vnet0") == (False, False, [MAC]), timeout=10), log(denv)
    assert poll(lambda: "; planned ahead, kernel written after " in log(denv), timeout=10), log(denv)
    assert _intents(denv) == [] and "interrupted operation" not in log(denv)


def test_a_state_dir_gone_read_only_between_the_arming_and_the_first_frame_leaves_the_port_recorded_or_as_it_was(
        lab, denv, daemon):
    import subprocess

    ifindex, xml, guest = incoming_guest(lab, denv)
    assert poll(lambda: packet_sockets(lab, ifindex) == 1 and _intents(denv), timeout=10), log(denv)
    armed = _intents(denv)
    state = denv["FDBHOOK_STATE_DIR"]
    # read-only in fdbhookd's own mount namespace only (the hooks, run by `ip netns exec`, still write)
    subprocess.run(["nsenter", "-t", str(daemon.pid), "-m", "sh", "-c",
                    "mount --bind %s %s && mount -o remount,bind,ro %s" % (state, state, state)], check=True)
    guest.send(frame(MAC))
    # the record cannot be committed: the kernel write is undone (the guest stays as paused: locked down, no
    # entry), the armed intent stays, fdbhookd serves on, one line and no traceback for what failed
    assert poll(lambda: "qemu/t1: first frame on vnet0: state " in log(denv), timeout=10), log(denv)
    assert "Read-only file system; changes undone" in log(denv)
    time.sleep(1.2)  # two resyncs (denv: every 0.5 s) find the store's lock file read-only
    assert pyroute2_view(lab, "vnet0") == (False, False, []) and _intents(denv) == armed
    assert daemon.poll() is None and "Traceback" not in log(denv), log(denv)
    assert "job Resync() failed: state " in log(denv)
    # writable again: the next run (here the started hook, served by fdbhookd) rolls the intent back; the
    # guest is as its record says (paused: no entry) until libvirt's RESUMED (tests/system/test_migration.py)
    subprocess.run(["nsenter", "-t", str(daemon.pid), "-m", "umount", state], check=True)
    assert hook(lab, denv, "started", xml).returncode == 0
    assert not _intents(denv) and "qemu/t1: an interrupted operation was rolled back (1 ports)" in log(denv)
    assert pyroute2_view(lab, "vnet0") == (False, False, []) and "Traceback" not in log(denv)
