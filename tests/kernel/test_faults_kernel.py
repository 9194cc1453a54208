"""Kernel tier: faults of the disk and of what fdbhook reads (issue 18), on real bridges and taps.

* ENOSPC (a small tmpfs as the state dir, filled up) and EROFS (the state dir
  bound read-only) at start and at stopped: one-line error, and the kernel
  exactly as it was, or the ports managed with their record; never a port
  changed without a record.
* Each of the seven kinds of corrupted record, with fdbhookd running: it
  stays up, ``fdbhook status`` tells the truth (exit code 5 and the
  quarantined path), and ``stopped`` still restores the ports (salvaged from
  the record's second copy).
* A config typo while fdbhookd runs: drift repair and link events keep
  working, hooks keep the last good config, status says so.
* 200 concurrent hook clients against one fdbhookd: none falls back.

State is read with iproute2 and pyroute2 (tests.kernel.test_hook_kernel),
never with fdbhook's own netlink code.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from fdbhook.lab import poll
from tests.helpers import bridge_nic, domain_xml, running_fdbhookd
from tests.kernel.test_hook_kernel import REPO, pyroute2_view, snapshot

pytestmark = pytest.mark.root

MACS = ("52:54:00:00:00:01", "52:54:00:00:00:02")
XML = domain_xml([bridge_nic(mac=MACS[0], dev="vnet0"), bridge_nic(mac=MACS[1], dev="vnet1", alias="net1")])
PORTS = ("vnet0", "vnet1")


@pytest.fixture
def fenv(tmp_path):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n[daemon]\nresync_interval = 0.3\n")
    return dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
                FDBHOOK_LOG=str(tmp_path / "log"), FDBHOOK_SOCKET=str(tmp_path / "fdbhookd.sock"),
                FDBHOOK_LIBVIRT_NETWORK_DIRS=str(tmp_path / "nonets"), PYTHONPATH=REPO)


@pytest.fixture
def ports(lab):
    lab.add_bridge("br0")
    for port in PORTS:
        lab.add_tap(port, bridge="br0")
    return lab


def hook(lab, env, op, xml=b"", name="t1", daemon=False):
    """The installed hook's entry (fdbhook.client.main): through fdbhookd if it answers."""
    code = "import sys; from fdbhook.client import main; sys.exit(main('qemu'))"
    env = dict(env) if daemon else dict(env, FDBHOOK_NO_DAEMON="1")
    return subprocess.run(lab.exec_argv([sys.executable, "-c", code, name, op, "begin", "-"]), input=xml,
                          env=env, capture_output=True, timeout=120)


def status(lab, env):
    return subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "status"]), env=env,
                          capture_output=True, timeout=120, text=True)


def record_files(env):
    return sorted(glob.glob(os.path.join(env["FDBHOOK_STATE_DIR"], "domains", "*.json")))


def managed(lab):
    return all(pyroute2_view(lab, p)[:2] == (False, False) for p in PORTS) and \
        [pyroute2_view(lab, p)[2] for p in PORTS] == [[MACS[0]], [MACS[1]]]


def pristine(lab):
    return all(pyroute2_view(lab, p) == (True, True, []) for p in PORTS)


def one_line(stderr):
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    return text.count("\n") == 1 and text.startswith("fdbhook: ") and "Traceback" not in text


@pytest.fixture
def mounts():
    """Mount points made by the test, unmounted (lazily) whatever happens."""
    made = []
    yield made
    for path in reversed(made):
        subprocess.run(["umount", "-l", path], capture_output=True)


def _fill(directory):
    """Fill the file system of ``directory`` (a small tmpfs) to the last block and inode."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    n = 0
    while True:
        try:
            with open(os.path.join(directory, "f%d" % n), "wb"):
                n += 1
        except OSError:
            break


# --- full and read-only state directory --------------------------------------------------------------

def test_enospc_at_start_changes_nothing_and_stopped_still_restores(ports, fenv, mounts):
    lab = ports
    state = fenv["FDBHOOK_STATE_DIR"]
    os.makedirs(state)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64,mode=0700", "tb-state", state], check=True)
    mounts.append(state)
    before = {p: snapshot(lab, p) for p in PORTS}

    # The lock and the record directories exist; then the disk fills up.
    os.makedirs(os.path.join(state, "domains"), exist_ok=True)
    os.makedirs(os.path.join(state, "domains.prev"), exist_ok=True)
    open(os.path.join(state, "lock"), "a").close()
    _fill(state)
    result = hook(lab, fenv, "start", XML)
    assert result.returncode == 1 and one_line(result.stderr), result.stderr
    assert b"No space left on device" in result.stderr
    assert {p: snapshot(lab, p) for p in PORTS} == before  # exactly as it was
    assert record_files(fenv) == []

    # Managed while there was room; the disk fills; stopped restores everything.
    for name in os.listdir(state):
        if name == "filler" or name[0] == "f" and name[1:].isdigit():
            os.unlink(os.path.join(state, name))
    assert hook(lab, fenv, "start", XML).returncode == 0
    assert managed(lab) and len(record_files(fenv)) == 1
    _fill(state)
    result = hook(lab, fenv, "stopped")
    assert (result.returncode, result.stderr) == (0, b"")
    assert pristine(lab) and record_files(fenv) == []


def test_erofs_at_start_and_stopped(ports, fenv, mounts):
    lab = ports
    state = fenv["FDBHOOK_STATE_DIR"]
    os.makedirs(state)
    before = {p: snapshot(lab, p) for p in PORTS}
    subprocess.run(["mount", "--bind", state, state], check=True)
    mounts.append(state)
    subprocess.run(["mount", "-o", "remount,bind,ro", state], check=True)
    result = hook(lab, fenv, "start", XML)
    assert result.returncode == 1 and one_line(result.stderr), result.stderr
    assert b"Read-only file system" in result.stderr
    assert {p: snapshot(lab, p) for p in PORTS} == before

    # Managed, then the state dir turns read-only: stopped cannot take the record's lock,
    # so it changes nothing (exit 0, as libvirt ignores it): ports managed and recorded, never half.
    subprocess.run(["mount", "-o", "remount,bind,rw", state], check=True)
    assert hook(lab, fenv, "start", XML).returncode == 0 and managed(lab)
    subprocess.run(["mount", "-o", "remount,bind,ro", state], check=True)
    assert hook(lab, fenv, "stopped").returncode == 0
    assert managed(lab) and len(record_files(fenv)) == 1
    subprocess.run(["mount", "-o", "remount,bind,rw", state], check=True)
    assert hook(lab, fenv, "stopped").returncode == 0
    assert pristine(lab) and record_files(fenv) == []


# --- fdbhookd and what it reads ------------------------------------------------------------------------

@pytest.fixture
def daemon(lab, fenv):
    with running_fdbhookd(lab.exec_argv([sys.executable, "-m", "fdbhook", "daemon", "--no-libvirt"]), fenv,
                          timeout=60) as proc:
        yield proc


def log(env):
    try:
        with open(env["FDBHOOK_LOG"], errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


def _corrupt(kind, path):
    with open(path, "rb") as handle:
        good = handle.read()
    bad = {
        "invalid JSON": b"{not json",
        "null": b"null",
        "nics of numbers": b'{"driver": "qemu", "domain": "t1", "nics": [5]}',
        "deeply nested": b"[" * 200000 + b"]" * 200000,
        "wrong types": json.dumps({"driver": "qemu", "domain": "t1", "nics": [
            {"mac": 5, "port": ["vnet0"], "ifindex": "x", "bridge": None}]}).encode(),
        "truncated": good[:len(good) // 2],
        "binary garbage": bytes(range(256)) * 8,
    }[kind]
    with open(path, "wb") as handle:
        handle.write(bad)


KINDS = ("invalid JSON", "null", "nics of numbers", "deeply nested", "wrong types", "truncated", "binary garbage")


def test_corrupted_records_with_fdbhookd(ports, fenv, daemon):
    """Every kind: fdbhookd stays up, status exits 5 naming the quarantined file, stopped restores the ports."""
    lab = ports
    quarantine = os.path.join(fenv["FDBHOOK_STATE_DIR"], "domains", ".quarantine")
    outcome = {}
    for kind in KINDS:
        assert hook(lab, fenv, "start", XML, daemon=True).returncode == 0
        assert managed(lab)
        [path] = record_files(fenv)
        _corrupt(kind, path)
        # the next resync (every 0.3 s) reads it: quarantined, restored from the second copy
        assert poll(lambda: glob.glob(os.path.join(quarantine, "*")), timeout=60), (kind, log(fenv)[-3000:])
        assert daemon.poll() is None, kind
        st = status(lab, fenv)
        assert st.returncode == 5 and "QUARANTINED record %s" % quarantine in st.stdout, (kind, st.stdout,
                                                                                         st.stderr)
        assert "Traceback" not in st.stderr
        result = hook(lab, fenv, "stopped", daemon=True)
        assert (result.returncode, result.stderr) == (0, b"")
        assert pristine(lab), kind
        assert record_files(fenv) == []
        outcome[kind] = "quarantined, salvaged, ports restored"
        for name in os.listdir(quarantine):
            os.unlink(os.path.join(quarantine, name))
        assert status(lab, fenv).returncode == 0
    assert daemon.poll() is None
    assert log(fenv).count("bad record") == len(KINDS)  # logged once each
    print(json.dumps(outcome, indent=1))


def test_corrupted_record_without_fdbhookd_stopped_restores(ports, fenv):
    """The standalone hook salvages too (no daemon read it first)."""
    lab = ports
    for kind in KINDS:
        assert hook(lab, fenv, "start", XML).returncode == 0 and managed(lab)
        _corrupt(kind, record_files(fenv)[0])
        result = hook(lab, fenv, "stopped")
        assert (result.returncode, result.stderr) == (0, b""), kind
        assert pristine(lab) and record_files(fenv) == [], kind


def test_config_typo_while_fdbhookd_runs(ports, fenv, daemon):
    lab = ports
    assert hook(lab, fenv, "start", XML, daemon=True).returncode == 0 and managed(lab)
    conf = fenv["FDBHOOK_CONF"]
    with open(conf, "a") as handle:
        handle.write("[manage]\nbridgez = br0\n")  # a typo (and a duplicate section)
    # drift repair goes on (the resync timer reads the config every round)
    lab.bridge("link", "set", "dev", "vnet0", "learning", "on", "flood", "on")
    assert poll(lambda: managed(lab), timeout=60), log(fenv)[-3000:]
    assert "last good config" in log(fenv)
    # link events go on: a managed port that vanishes has its record pruned
    lab.ip("link", "del", "vnet1")
    assert poll(lambda: MACS[1] not in open(record_files(fenv)[0]).read(), timeout=60), log(fenv)[-3000:]
    # hooks (served by fdbhookd, or standalone) manage with the last good config
    lab.add_tap("vnet2", bridge="br0")
    xml2 = domain_xml([bridge_nic(mac="52:54:00:00:00:03", dev="vnet2")], name="t2")
    assert hook(lab, fenv, "start", xml2, name="t2", daemon=True).returncode == 0
    assert hook(lab, fenv, "stopped", name="t2").returncode == 0
    assert hook(lab, fenv, "start", xml2, name="t2").returncode == 0  # standalone: config.last-good
    assert pyroute2_view(lab, "vnet2") == (False, False, ["52:54:00:00:00:03"])
    st = status(lab, fenv)
    assert st.returncode == 5 and "CONFIG BAD" in st.stdout and "last good config" in st.stdout, st.stdout
    assert "restarted" not in st.stdout  # no thread had to be restarted
    assert daemon.poll() is None
    # fixed: status clean again, and the daemon follows
    with open(conf, "w") as handle:
        handle.write("[manage]\nbridges = br0\n[daemon]\nresync_interval = 0.3\n")
    assert poll(lambda: status(lab, fenv).returncode == 0, timeout=60)


# --- the fallback: 200 hooks at once are all served by fdbhookd ---------------------------------------------

CLIENT = """
import os, sys, time
from fdbhook import client
go = sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.01)
answer = client.offer("qemu", [sys.argv[1], "migrate", "begin", "-"], b"<domain/>")
sys.stdout.write("served" if answer is not None and answer[0] == 0 else "fell back: %s" % client.last_failure)
"""


def test_200_concurrent_hooks_are_served(lab, fenv, daemon, tmp_path):
    go = str(tmp_path / "go")
    procs = [subprocess.Popen(lab.exec_argv([sys.executable, "-c", CLIENT, "m%d" % i, go]), env=fenv,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(200)]
    # every client is up and waiting (its interpreter loaded) before they all go
    poll(lambda: False, timeout=2)
    open(go, "w").close()
    outs = [p.communicate(timeout=300) for p in procs]
    served = sum(out == b"served" for out, _ in outs)
    assert served == 200, [o for o in outs if o[0] != b"served"][:3]
    marks = os.listdir(os.path.join(fenv["FDBHOOK_STATE_DIR"], "incoming"))
    assert len(marks) == 200  # each migrate hook marked its incoming migration


# --- a guest that is none of ours always starts -------------------------------------------------------------

def test_guest_not_ours_starts_whatever_its_xml(lab, fenv):
    """Issue 18 item 5, on real ports: refused-by-the-parser XML on an unmanaged bridge exits 0, changes nothing;
    a type='ethernet' tap on the managed bridge (the XML names no bridge) is still managed."""
    lab.add_bridge("br0")
    lab.add_bridge("other")
    lab.add_tap("vnet0", bridge="other")
    lab.add_tap("tap5", bridge="br0")
    before = snapshot(lab, "vnet0")
    hostile = (b"<!DOCTYPE d [<!ENTITY x 'y'>]><domain><name>t1</name><devices><interface type='bridge'>"
               b"<mac address='52:54:00:00:00:01'/><source bridge='other'/><target dev='vnet0'/></interface>"
               b"</devices></domain>")
    for op in ("start", "started", "reconnect"):
        result = hook(lab, fenv, op, hostile)
        assert (result.returncode, result.stderr) == (0, b""), result.stderr
    assert snapshot(lab, "vnet0") == before and record_files(fenv) == []
    eth = domain_xml(["<interface type='ethernet'><mac address='52:54:00:00:00:05'/><target dev='tap5'/>"
                      "</interface>"], name="t5")
    assert hook(lab, fenv, "start", eth, name="t5").returncode == 0
    assert pyroute2_view(lab, "tap5") == (False, False, ["52:54:00:00:00:05"])
    assert hook(lab, fenv, "stopped", name="t5").returncode == 0
    assert pyroute2_view(lab, "tap5") == (True, True, [])
