"""Kernel tier: fdbhookd (no libvirt) locks an unknown guest port down at its join (fdbhook.lockdown) and
touches nothing that is not unmistakably a guest's; the apply that claims the port records its ORIGINAL
state; a port nobody claims is put back at its bound, when it leaves the bridge, or at fdbhookd's restart."""

import json
import os
import subprocess
import sys

import pytest

from fdbhook.lab import poll
from tests.helpers import bridge_nic, domain_xml
from tests.kernel.test_hook_kernel import REPO

pytestmark = pytest.mark.root


def env_for(tmp_path, bound):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\nuplinks = vnet7\nhotplug_lockdown = %s\n" % bound)
    return dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
                FDBHOOK_LOG=str(tmp_path / "log"), FDBHOOK_SOCKET=str(tmp_path / "fdbhookd.sock"), PYTHONPATH=REPO)


def start_daemon(lab, env):
    try:
        os.unlink(env["FDBHOOK_SOCKET"])
    except FileNotFoundError:
        pass
    proc = subprocess.Popen(lab.exec_argv([sys.executable, "-m", "fdbhook", "daemon", "--no-libvirt"]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    if not poll(lambda: os.path.exists(env["FDBHOOK_SOCKET"]) or proc.poll() is not None, timeout=30) \
            or proc.poll() is not None:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail("fdbhookd did not come up: %s" % read(env["FDBHOOK_LOG"])[-2000:])
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


def read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def flags(lab, port):
    f = lab.port_flags(port)
    return bool(f["learning"]), bool(f["flood"])


def pending(env):
    directory = os.path.join(env["FDBHOOK_STATE_DIR"], "pending")
    out = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if name.startswith(".") or not name.endswith(".json"):
            continue  # a write in progress
        try:
            with open(os.path.join(directory, name)) as handle:
                data = json.load(handle)
        except FileNotFoundError:  # settled meanwhile
            continue
        out[data["port"]] = (data["learning"], data["flood"])
    return out


def join_locked_down(lab, env, port, mac):
    """Tap PORT (address MAC) joins br0; wait until fdbhookd has locked it down with its pending record."""
    lab.add_tap(port, bridge="br0", mac=mac)
    assert poll(lambda: flags(lab, port) == (False, False) and port in pending(env), timeout=30), \
        read(env["FDBHOOK_LOG"])[-2000:]


def pending_file(env, port):
    directory = os.path.join(env["FDBHOOK_STATE_DIR"], "pending")
    (name,) = [n for n in os.listdir(directory) if n.endswith(".json") and port in read(os.path.join(directory, n))]
    return os.path.join(directory, name)


def statics(lab, port):
    return sorted(e["mac"] for e in lab.fdb(dev=port) if e.get("state") == "static")


def test_unknown_guest_ports_locked_down_at_join_claimed_with_their_original_state_nothing_else_touched(
        lab, tmp_path):
    env = env_for(tmp_path, 300)
    lab.add_bridge("br0")
    # an admin's port that looks like a guest's tap but carries an admin's static entry
    lab.add_tap("vnet6", bridge="br0", mac="fe:54:00:00:00:06")
    lab.bridge("fdb", "add", "52:54:00:aa:bb:cc", "dev", "vnet6", "master", "static")
    proc = start_daemon(lab, env)
    try:
        lab.ip("link", "set", "dev", "vnet6", "alias", "admin")  # an event for it, with its master (not a join)
        lab.add_tap("eth1", bridge="br0", mac="fe:54:00:00:00:11")  # a tap addressed like libvirt's, not its name
        lab.add_veth("wan0", "wan0p", bridge="br0")  # an uplink veth
        lab.add_tap("vnet5", bridge="br0", mac="52:54:00:00:00:05")  # a tun without the tap address
        lab.add_tap("vnet7", bridge="br0", mac="fe:54:00:00:00:07")  # listed in [manage] uplinks
        lab.add_veth("vnet8", "q2hc8", bridge="br0", mac="52:54:00:00:00:08")  # lxc: host veth, peer in the host ns
        lab.add_tap("vnet11", bridge="br0", mac="fe:54:00:00:00:0b")  # qemu: its NIC has an admin's MAC 02:54:..
        lab.add_tap("vnet9", bridge="br0", mac="fe:54:00:00:00:09")  # qemu: a hot-plugged NIC's tap
        # events are handled in order: once vnet9 (the last) is locked down, every port before it was decided
        assert poll(lambda: flags(lab, "vnet9") == (False, False), timeout=30), read(env["FDBHOOK_LOG"])[-3000:]
        assert flags(lab, "vnet8") == (False, False) == flags(lab, "vnet11")
        # each with the entry its port predicts: lxc the peer's MAC, qemu the tap's under libvirt's prefix
        assert statics(lab, "vnet8") == ["52:54:00:00:00:08"] and statics(lab, "vnet9") == ["52:54:00:00:00:09"]
        assert statics(lab, "vnet11") == ["52:54:00:00:00:0b"]
        for port in ("vnet6", "eth1", "wan0", "vnet5", "vnet7"):
            assert flags(lab, port) == (True, True), port
        assert statics(lab, "vnet6") == ["52:54:00:aa:bb:cc"]
        assert statics(lab, "eth1") == statics(lab, "vnet5") == statics(lab, "vnet7") == statics(lab, "wan0") == []
        assert pending(env) == {"vnet8": (True, True), "vnet9": (True, True), "vnet11": (True, True)}
        status = subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "status"]), env=env,
                                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert "PENDING vnet9 on br0: locked down at its join (qemu tap vnet9" in status.stdout, status.stdout
        assert "static entry for 52:54:00:00:00:09 predicted from the port" in status.stdout, status.stdout
        assert len(pending(env)) == 3  # within the bound: kept

        # the NIC becomes known (here: a start hook's XML): the apply takes the port over
        hook = subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "hook", "qemu", "t1", "start",
                                             "begin", "-"]),
                              input=domain_xml([bridge_nic(mac="02:54:00:00:00:0b", dev="vnet11", alias="net1"),
                                                bridge_nic(mac="52:54:00:00:00:09", dev="vnet9")]), env=env,
                              capture_output=True, timeout=60)
        assert hook.returncode == 0, hook.stderr
        with open(os.path.join(env["FDBHOOK_STATE_DIR"], "domains", "qemu-t1.json")) as handle:
            nics = {nic["port"]: nic for nic in json.load(handle)["nics"]}
        for port in ("vnet9", "vnet11"):  # their state from before the lock-down
            assert (nics[port]["prev_learning"], nics[port]["prev_flood"]) == (True, True)
        assert flags(lab, "vnet9") == (False, False) and statics(lab, "vnet9") == ["52:54:00:00:00:09"]
        # the wrong prediction is gone, the NIC's own entry in
        assert flags(lab, "vnet11") == (False, False) and statics(lab, "vnet11") == ["02:54:00:00:00:0b"]
        assert pending(env) == {"vnet8": (True, True)}

        # a locked-down port that leaves the bridge: its pending record goes
        lab.add_veth("vnet10", "q2hc10", bridge="br0")
        assert poll(lambda: "vnet10" in pending(env), timeout=30)
        lab.ip("link", "set", "dev", "vnet10", "nomaster")
        assert poll(lambda: "vnet10" not in pending(env), timeout=30)

        # fdbhookd killed and started again: the lock-downs nobody claimed are put back as they were
        proc.kill()
        proc.wait(timeout=30)
        proc = start_daemon(lab, env)
        assert poll(lambda: pending(env) == {}, timeout=30), read(env["FDBHOOK_LOG"])[-2000:]
        assert flags(lab, "vnet8") == (True, True) and statics(lab, "vnet8") == []
        assert flags(lab, "vnet9") == (False, False) and statics(lab, "vnet9") == ["52:54:00:00:00:09"]
    finally:
        stop(proc)


def test_a_locked_down_port_nobody_claims_is_put_back_at_its_bound(lab, tmp_path):
    env = env_for(tmp_path, 1)
    lab.add_bridge("br0")
    proc = start_daemon(lab, env)
    try:
        lab.add_tap("vnet3", bridge="br0", mac="fe:54:00:00:00:03")
        assert poll(lambda: "vnet3: no NIC claimed it" in read(env["FDBHOOK_LOG"]), timeout=30), \
            read(env["FDBHOOK_LOG"])[-2000:]
        assert "vnet3 joined br0: locked down until its NIC is known" in read(env["FDBHOOK_LOG"])
        assert flags(lab, "vnet3") == (True, True) and pending(env) == {} and statics(lab, "vnet3") == []
    finally:
        stop(proc)


def test_a_locked_down_port_is_put_back_when_fdbhookd_stops_not_left_for_a_start_that_may_never_come(
        lab, tmp_path):
    # fdbhookd stopped for good (the package removed, an older version installed) while a hot-plugged
    # NIC's port waits for its NIC: nothing would put the port back, and it would neither learn nor flood
    env = env_for(tmp_path, 300)
    lab.add_bridge("br0")
    proc = start_daemon(lab, env)
    try:
        join_locked_down(lab, env, "vnet9", "fe:54:00:00:00:09")
        assert statics(lab, "vnet9") == ["52:54:00:00:00:09"]
    finally:
        stop(proc)
    assert proc.returncode == 0
    assert flags(lab, "vnet9") == (True, True) and statics(lab, "vnet9") == [] and pending(env) == {}
    assert "vnet9: no NIC claimed it after its lock-down" in read(env["FDBHOOK_LOG"])


def test_a_stop_with_a_read_only_or_full_state_dir_or_a_corrupted_record_leaves_ports_recorded_or_as_they_were(
        lab, tmp_path):
    env = env_for(tmp_path, 300)
    state = env["FDBHOOK_STATE_DIR"]
    lab.add_bridge("br0")

    def lock_down(port, mac):
        proc = start_daemon(lab, env)
        join_locked_down(lab, env, port, mac)
        return proc

    os.makedirs(state)
    subprocess.run(["mount", "--bind", state, state], check=True)
    try:
        # read-only at the stop: the store's lock cannot be taken, nothing changes; the next start restores
        proc = lock_down("vnet1", "fe:54:00:00:00:01")
        # in fdbhookd's own mount namespace (ip netns exec made it; a remount here would not reach it)
        subprocess.run(["nsenter", "-t", str(proc.pid), "-m", "mount", "-o", "remount,bind,ro", state], check=True)
        stop(proc)
        assert proc.returncode == 0
        log = read(env["FDBHOOK_LOG"])
        assert "settling locked-down ports: state " in log and "Read-only file system" in log
        assert flags(lab, "vnet1") == (False, False) and statics(lab, "vnet1") == ["52:54:00:00:00:01"]
        assert "vnet1" in pending(env)
        subprocess.run(["mount", "-o", "remount,bind,rw", state], check=True)
        stop(start_daemon(lab, env))
        assert flags(lab, "vnet1") == (True, True) and statics(lab, "vnet1") == [] and pending(env) == {}
    finally:
        subprocess.run(["umount", state], check=True)

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64,mode=0700", "tl-state", state], check=True)
    try:
        # full at the stop: putting back only removes files, so it goes through
        proc = lock_down("vnet2", "fe:54:00:00:00:02")
        n = 0
        while True:
            try:
                with open(os.path.join(state, "filler%d" % n), "wb") as handle:
                    handle.write(b"\0" * 4096)
                n += 1
            except OSError:
                break
        stop(proc)
        assert proc.returncode == 0
        assert flags(lab, "vnet2") == (True, True) and statics(lab, "vnet2") == [] and pending(env) == {}
        for name in os.listdir(state):
            if name.startswith("filler"):
                os.unlink(os.path.join(state, name))

        # a corrupted pending record: quarantined, its second copy puts the port back as it was
        proc = lock_down("vnet3", "fe:54:00:00:00:03")
        path = pending_file(env, "vnet3")
        with open(path, "w") as handle:
            handle.write('{"format": 1, "port": ')
        stop(proc)
        assert proc.returncode == 0 and pending(env) == {}
        assert flags(lab, "vnet3") == (True, True) and statics(lab, "vnet3") == []
        assert "restored from its second copy" in read(env["FDBHOOK_LOG"])
        quarantined = os.listdir(os.path.join(state, "domains", ".quarantine"))
        assert [n.startswith("pending-" + os.path.basename(path)) for n in quarantined] == [True]

        # the record and its copy both corrupted: quarantined, the port is not touched (its state before is
        # unknown)
        proc = lock_down("vnet4", "fe:54:00:00:00:04")
        path = pending_file(env, "vnet4")
        for victim in (path, os.path.join(state, "pending.prev", os.path.basename(path))):
            with open(victim, "w") as handle:
                handle.write("[]")
        stop(proc)
        assert proc.returncode == 0 and not os.path.exists(path)
        assert flags(lab, "vnet4") == (False, False) and statics(lab, "vnet4") == ["52:54:00:00:00:04"]
        assert "no good second copy (not a JSON object): the port's state before its lock-down is unknown" \
            in read(env["FDBHOOK_LOG"])
        assert not os.listdir(os.path.join(state, "pending.prev"))
    finally:
        subprocess.run(["umount", state], check=True)


def test_another_domains_xml_naming_a_locked_down_tap_without_an_entry_does_not_take_it(lab, tmp_path):
    """With nothing predicted the pending tap carries no entry; the tap's own address still says whose it is."""
    env = env_for(tmp_path, 300)
    with open(env["FDBHOOK_CONF"], "a") as conf:
        conf.write("hotplug_predict = no\n")
    lab.add_bridge("br0")
    proc = start_daemon(lab, env)
    try:
        join_locked_down(lab, env, "vnet3", "fe:54:00:00:00:03")
        assert statics(lab, "vnet3") == []

        def start(domain, mac, metadata=""):
            xml = domain_xml([bridge_nic(mac=mac, dev="vnet3")], name=domain, metadata=metadata).decode()
            return subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "hook", "qemu", domain, "start",
                                                 "begin", "-"]),
                                  input=xml, env=env, capture_output=True, text=True, timeout=60)

        evil = start("evil", "52:54:00:00:00:66")
        assert evil.returncode == 1
        assert evil.stderr.strip().splitlines() == [
            "fdbhook: domain evil: NIC net0 (52:54:00:00:00:66): port vnet3 is the tap libvirt made for another "
            "NIC (its address fe:54:00:00:00:03 is not from this NIC's MAC): refused"], evil.stderr
        assert flags(lab, "vnet3") == (False, False) and statics(lab, "vnet3") == [] and "vnet3" in pending(env)
        assert not os.path.exists(os.path.join(env["FDBHOOK_STATE_DIR"], "domains", "qemu-evil.json"))
        # nor does an opted-out NIC naming it end its lock-down early (its own NIC's would)
        off = start("evil2", "52:54:00:00:00:67", metadata="<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>"
                    "<fdb:interface mac='52:54:00:00:00:67' mode='off'/></fdb:fdb></metadata>")
        assert off.returncode == 0, off.stderr
        assert flags(lab, "vnet3") == (False, False) and "vnet3" in pending(env)
        own = start("t1", "52:54:00:00:00:03")
        assert own.returncode == 0, own.stderr
        assert statics(lab, "vnet3") == ["52:54:00:00:00:03"] and pending(env) == {}
    finally:
        stop(proc)
