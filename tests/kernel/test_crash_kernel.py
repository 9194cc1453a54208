"""Kernel tier: kill the real hook entry at every kernel request and every state-file write, fail each
kernel request, and check that the next lifecycle event leaves every port managed-with-a-record or
exactly as it was (tests/crashlab.py does the work inside the lab's namespace)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_crashlab(lab, tmp_path, *args):
    out = tmp_path / "crash.json"
    argv = lab.exec_argv([sys.executable, "-m", "tests.crashlab", "--json", str(out), *args])
    res = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                         timeout=900, stdin=subprocess.DEVNULL)
    assert out.exists(), res.stdout[-2000:] + res.stderr[-2000:]
    return json.loads(out.read_text()), res


def test_every_crash_and_fault_point_keeps_every_port_managed_or_original(lab, tmp_path):
    data, res = run_crashlab(lab, tmp_path, "--nics", "1,4", "--faults", "EINVAL,EBUSY,ENOBUFS",
                             "--fault-nics", "1")
    assert data["violations"] == 0, res.stdout[-4000:]
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {(r["nics"], r["op"], r["mode"], r["kind"] if r["mode"] == "crash" else r["errno"]): r
            for r in data["rows"]}
    for op in ("start", "stopped", "release", "reconnect", "attach", "detach", "macchange", "suspend", "resume",
               "resync"):
        for nics in (1, 4):
            assert rows[(nics, op, "crash", "kernel")]["points"] >= 1, (nics, op)
            assert rows[(nics, op, "crash", "file")]["points"] >= 1, (nics, op)
    # 4 NICs: every request of every port is a kill point, and the kills did leave damage to repair
    start = rows[(4, "start", "crash", "kernel")]
    assert start["points"] >= 8 and start["dirty"] == start["points"]
    # a refused start leaves the kernel as it was, with exit 1 and one line (checked by crashlab)
    for errname in ("EINVAL", "EBUSY", "ENOBUFS"):
        row = rows[(1, "start", "fault", errname)]
        assert row["points"] >= 1 and row["dirty"] == 0 and set(row["exit_codes"]) == {"1"}, row
        assert set(rows[(1, "stopped", "fault", errname)]["exit_codes"]) == {"0"}
    # fdbhookd's suspend takes every entry out, resume puts them back, resync heals drift: a kill at each
    # request of each leaves damage the next event repairs
    for op in ("suspend", "resume", "resync"):
        row = rows[(4, op, "crash", "kernel")]
        assert row["points"] >= 3 and row["dirty"] == row["points"], row


def killed_start(lab, tmp_path):
    """A two-NIC start killed after its 4th kernel request: port 1 managed, port 2 half, no record."""
    from tests.helpers import bridge_nic, domain_xml

    lab.add_bridge("br0")
    for i in range(2):
        lab.add_tap("vnet%d" % i, bridge="br0")
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n")
    env = dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
               FDBHOOK_LOG=str(tmp_path / "log"), FDBHOOK_SOCKET=str(tmp_path / "fdbhookd.sock"), PYTHONPATH=REPO)
    xml = domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")])
    argv = lab.exec_argv([sys.executable, "-m", "fdbhook", "hook", "qemu", "t1", "start", "begin", "-"])
    killed = subprocess.run(argv, input=xml, env=dict(env, FDBHOOK_CRASH_AT="kernel:4"),
                            capture_output=True, timeout=60)
    assert killed.returncode == -9
    assert lab.port_flags("vnet0")["learning"] is False  # half done: the first port is managed, no record
    assert os.listdir(tmp_path / "state" / "intents") == ["qemu-t1.json"]
    return env


def as_before(lab, tmp_path):
    flags = [lab.port_flags(port) for port in ("vnet0", "vnet1")]
    return (all((f["learning"], f["flood"]) == (True, True) for f in flags)
            and not [e for e in lab.fdb(br="br0") if e["state"] == "static"]
            and os.listdir(tmp_path / "state" / "intents") == [])


def test_fdbhookd_start_up_undoes_a_killed_start(lab, tmp_path):
    from fdbhook.lab import poll

    env = killed_start(lab, tmp_path)
    proc = subprocess.Popen(lab.exec_argv([sys.executable, "-m", "fdbhook", "daemon", "--no-libvirt"]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert poll(lambda: as_before(lab, tmp_path) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None and as_before(lab, tmp_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_status_finishes_or_undoes_a_killed_start_before_showing_it(lab, tmp_path):
    env = killed_start(lab, tmp_path)
    status = subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "status"]), env=env,
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert status.returncode == 0, status.stdout + status.stderr
    assert as_before(lab, tmp_path)
    assert "interrupted operation was rolled back" in (tmp_path / "log").read_text()


def test_a_kill_or_fault_at_every_step_of_a_lock_down_its_claim_and_its_put_back(lab, tmp_path):
    """fdbhookd's lock-down of an unknown guest port at its join, the apply that claims it (its NIC's MAC
    the one the tap predicted, or another: the predicted entry goes), the put-back at the bound: after a
    kill at each step the next run leaves the port managed with a record whose state-before is the
    ORIGINAL one and only its NIC's entry, or exactly as it was, and no pending record."""
    data, res = run_crashlab(lab, tmp_path, "--nics", "1,4", "--ops",
                             "lockdown,lockdown-undo,claim,claim-other,expire",
                             "--faults", "EINVAL", "--fault-nics", "1")
    assert data["violations"] == 0, res.stdout[-4000:]
    rows = {(r["nics"], r["op"], r["mode"], r["kind"] if r["mode"] == "crash" else r["errno"]): r
            for r in data["rows"]}
    for op in ("lockdown", "lockdown-undo", "claim", "claim-other", "expire"):
        for nics in (1, 4):
            assert rows[(nics, op, "crash", "kernel")]["points"] >= 1, (nics, op)
            assert rows[(nics, op, "crash", "file")]["points"] >= 1, (nics, op)
    # the lock-down writes its pending record (after its second copy) first, then the sends (learning/flood
    # off and the flush, then the predicted entry: the tap is addressed from the NIC's MAC 52:54:00:..)
    assert rows[(1, "lockdown", "crash", "file")]["points"] == 2
    assert rows[(1, "lockdown", "crash", "kernel")]["points"] == 3
    # a refused lock-down request is undone at once: nothing left to repair
    assert rows[(1, "lockdown", "fault", "EINVAL")]["dirty"] == 0


def test_a_kill_or_fault_at_every_step_of_a_resume_planned_ahead_and_fired(lab, tmp_path):
    """fdbhookd on a migration's destination writes the paused guest's resume intent ahead and fires it at
    the guest's first frame: killed at any step (its intent then has no live owner), the next run leaves
    the ports paused (locked down, no entry) or resumed (entries in), and no intent."""
    data, res = run_crashlab(lab, tmp_path, "--nics", "1,4", "--ops", "firstframe", "--faults", "EINVAL",
                             "--fault-nics", "1")
    assert data["violations"] == 0, res.stdout[-4000:]
    rows = {(r["nics"], r["op"], r["mode"], r["kind"] if r["mode"] == "crash" else r["errno"]): r
            for r in data["rows"]}
    # arming writes the intent (1 file); firing sends the entries, then the record and the intent's removal
    assert rows[(1, "firstframe", "crash", "file")]["points"] >= 3
    assert rows[(1, "firstframe", "crash", "kernel")]["points"] >= 1
    assert rows[(4, "firstframe", "crash", "kernel")]["points"] >= 4
