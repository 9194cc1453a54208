"""An incoming guest's first frame on its new port puts its entries in (fdbhook.firstframe, fdbhookd's use of it)."""

import os
import time

from fdbhook import daemon as D
from fdbhook.firstframe import PACKET_OUTGOING, FirstFrames, Watch, bpf_program, wanted
from fdbhook.model import DomainRecord, NicRecord
from tests.fakes import FakeKernel

MAC, EXTRA, CONFIGURED = "52:54:00:00:00:01", "52:54:00:00:00:0a", "52:54:00:00:00:0c"


def record(name="t1", paused=True, nics=((11, "vnet0", MAC),)):
    return DomainRecord(driver="qemu", domain=name, paused=paused,
                        nics=tuple(NicRecord(mac=mac, port=port, ifindex=ifindex, bridge="br0")
                                   for ifindex, port, mac in nics))


def run_bpf(prog, frame, pkttype=0):
    """A classic BPF interpreter for the instructions bpf_program uses: bytes accepted (0: dropped)."""
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20 and k == 0xFFFFF004:
            acc = pkttype
        elif code == 0x20:
            acc = int.from_bytes(frame[k:k + 4], "big")
        elif code == 0x28:
            acc = int.from_bytes(frame[k:k + 2], "big")
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError("unexpected BPF code %#x" % code)
        pc += 1


def frame(src, dst="ff:ff:ff:ff:ff:ff"):
    return bytes.fromhex(dst.replace(":", "") + src.replace(":", "")) + b"\x80\x35" + bytes(46)


def test_only_ports_of_paused_records_marked_incoming_are_watched_for_the_nics_known_macs():
    rec = NicRecord(mac=MAC, port="vnet0", ifindex=11, bridge="br0", extra_macs=(EXTRA,), config_mac=CONFIGURED)
    records = [DomainRecord(driver="qemu", domain="t1", paused=True, nics=(rec,)),
               record("t2", nics=((12, "vnet1", "52:54:00:00:00:02"),)),  # paused, not incoming (suspended)
               record("t3", paused=False, nics=((13, "vnet2", "52:54:00:00:00:03"),))]  # running
    want = wanted(records, {("qemu", "t1"), ("qemu", "t3")})
    assert want == {11: Watch(11, "vnet0", "qemu", "t1", (MAC, EXTRA, CONFIGURED))}


def test_the_filter_takes_a_frame_the_port_receives_from_a_known_mac_and_nothing_else():
    prog = bpf_program([MAC, EXTRA])
    assert run_bpf(prog, frame(MAC)) > 0
    assert run_bpf(prog, frame(EXTRA, dst="02:00:00:00:00:09")) > 0
    assert run_bpf(prog, frame("52:54:00:00:00:02")) == 0  # another source
    assert run_bpf(prog, frame("52:54:00:00:01:01")) == 0  # same first four bytes
    assert run_bpf(prog, frame("02:00:00:00:00:09", dst=MAC)) == 0  # the MAC as destination
    assert run_bpf(prog, frame(MAC), pkttype=PACKET_OUTGOING) == 0  # sent to the guest, not by it
    assert run_bpf(bpf_program([MAC]), frame(MAC)) > 0 and run_bpf(bpf_program([MAC]), frame(EXTRA)) == 0


def test_the_filter_refuses_no_macs_and_more_than_its_jumps_reach():
    for macs in ([], ["52:54:00:00:%02x:%02x" % divmod(i, 256) for i in range(51)]):
        try:
            bpf_program(macs)
        except ValueError:
            continue
        raise AssertionError("accepted %d MACs" % len(macs))
    macs = ["52:54:00:00:00:%02x" % i for i in range(50)]
    assert all(run_bpf(bpf_program(macs), frame(mac)) > 0 for mac in macs)


def test_a_domain_fires_once_and_its_ports_are_closed():
    ff = FirstFrames()
    want = wanted([record(nics=((11, "vnet0", MAC), (12, "vnet1", EXTRA)))], {("qemu", "t1")})
    opened, closed = ff.update(want, 0.0)
    assert [w.ifindex for w in opened] == [11, 12] and closed == []
    watch, closing = ff.fired(12)
    assert watch.port == "vnet1" and sorted(w.ifindex for w in closing) == [11, 12]
    assert ff.fired(11) == (None, [])
    assert ff.update(want, 1.0) == ([], [])  # still wanted (RESUMED not seen yet): not opened again
    assert ff.update({}, 2.0) == ([], [])  # RESUMED: gone from the wanted set
    assert [w.ifindex for w in ff.update(want, 3.0)[0]] == [11, 12]  # a new incoming migration of t1


def test_ports_leaving_the_wanted_set_changing_or_watched_too_long_are_closed():
    ff = FirstFrames(watch_for=10.0)
    want = wanted([record(), record("t2", nics=((12, "vnet1", EXTRA),))], {("qemu", "t1"), ("qemu", "t2")})
    ff.update(want, 0.0)
    assert ff.update({11: want[11]}, 1.0) == ([], [want[12]])  # t2 resumed, stopped or detached
    changed = {11: Watch(11, "vnet0", "qemu", "t1", (EXTRA,))}
    assert ff.update(changed, 2.0) == ([changed[11]], [want[11]])
    assert ff.update(changed, 13.0) == ([], [changed[11]])  # too long: RESUMED will do it
    assert ff.update(changed, 14.0) == ([], [])
    assert ff.fired(11) == (None, [])
    ff2 = FirstFrames()
    ff2.update(want, 0.0)
    assert ff2.dropped(11) == want[11] and ff2.dropped(11) is None  # its port vanished
    assert ff2.update(want, 1.0) == ([], [])


def _incoming(tmp_path, monkeypatch):
    monkeypatch.setenv("FDBHOOK_STATE_DIR", str(tmp_path / "state"))
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n")
    d = D.Daemon(config_path=str(conf), socket_path=str(tmp_path / "sock"), use_libvirt=False)
    k = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    k.by_name("vnet0")  # ifindex 11
    store = d.store()
    store.mark_incoming("qemu", "t1")
    from fdbhook import engine
    from fdbhook.domxml import parse_domain
    from tests.helpers import bridge_nic, domain_xml

    domain = parse_domain(domain_xml([bridge_nic(dev="vnet0")], name="t1"), driver="qemu")
    engine.apply_domain(domain, d.config(), k, store, paused=True)
    d.note_ports_changed()
    return d, k, store


def test_the_first_frame_runs_what_resumed_would_and_resumed_finds_it_done(tmp_path, monkeypatch, caplog):
    d, k, store = _incoming(tmp_path, monkeypatch)
    assert k.fdb_get(MAC, 10) is None and list(d._frames_want) == [11]
    caplog.set_level("INFO")
    d._first_frame(k, d._frames_want[11])
    assert k.fdb_get(MAC, 10).ifindex == 11 and not store.load("qemu", "t1").paused
    assert not store.is_incoming("qemu", "t1") and d._frames_want == {} and d.first_frames == 1
    assert "qemu/t1: first frame of the incoming guest on vnet0: entries in before RESUMED, " in caplog.text
    d.run_job(k, D.Pause("qemu", "t1", False))  # RESUMED: nothing left to do
    assert k.fdb_get(MAC, 10).ifindex == 11 and d.first_frames == 1


def test_a_frame_after_resumed_and_suspended_changes_nothing(tmp_path, monkeypatch):
    d, k, store = _incoming(tmp_path, monkeypatch)
    watch = d._frames_want[11]
    d.run_job(k, D.Pause("qemu", "t1", False))
    assert k.fdb_get(MAC, 10).ifindex == 11 and d._frames_want == {}
    d.run_job(k, D.Pause("qemu", "t1", True))
    d._first_frame(k, watch)  # a frame the poll loop saw before RESUMED, handled late
    assert k.fdb_get(MAC, 10) is None and store.load("qemu", "t1").paused and d.first_frames == 0


def test_the_frames_window_starts_when_the_port_received_it_not_when_fdbhookd_woke():
    at, woke_ms = D._received((100.0, 5000.0), 4999.997)  # stamped 3 ms before the poll returned
    assert abs(at - 99.997) < 1e-9 and abs(woke_ms - 3.0) < 1e-6
    for stamp in (None, 5000.5, 4990.0):  # no stamp, one after the wake-up, one a clock step away
        assert D._received((100.0, 5000.0), stamp) == (100.0, 0.0)


def _open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_an_armed_resume_holds_its_lock_file_until_fired_or_disarmed(tmp_path, monkeypatch, caplog):
    from fdbhook import engine

    d, k, store = _incoming(tmp_path, monkeypatch)
    before = _open_fds()
    armed = engine.arm_record("qemu", "t1", k, store)
    assert armed is not None and _open_fds() == before + 1
    engine.disarm(armed)  # the frame will not come: the intent goes, the file closes
    assert _open_fds() == before and store.stamp("qemu", "t1")[0] is None
    armed = engine.arm_record("qemu", "t1", k, store)
    caplog.set_level("DEBUG")
    d._first_frame(k, d._frames_want[11], (time.monotonic(), 0.1), armed)  # planned ahead: the writes alone
    assert k.fdb_get(MAC, 10).ifindex == 11 and not store.load("qemu", "t1").paused and _open_fds() == before
    assert "first frame: woken after 0.10 ms, store lock after " in caplog.text
    assert engine.arm_record("qemu", "t1", k, store) is None and _open_fds() == before  # nothing left to arm


def test_the_watch_thread_asks_for_sched_fifo_1_and_stays_at_the_nice_when_refused():
    import subprocess
    import sys

    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root")
    code = ("import os, threading\nfrom fdbhook.daemon import _realtime\n"
            "def run():\n    print(_realtime('frames'), os.sched_getscheduler(0) == os.SCHED_FIFO)\n"
            "t = threading.Thread(target=run); t.start(); t.join()\n"
            "print(os.sched_getscheduler(0) == os.SCHED_OTHER)")  # the thread alone, never the process
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["True", "True", "True"], out
    # without CAP_SYS_NICE and with RLIMIT_RTPRIO 0 (a unit that could not be given LimitRTPRIO=1): refused
    out = subprocess.run(["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice", "prlimit", "--rtprio=0",
                          sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False", "True"], out
