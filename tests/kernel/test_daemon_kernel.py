"""fdbhookd without libvirt: the hook fast path, fallback, drift repair, raw netlink only."""

import os
import subprocess
import sys
import time

import pytest

from fdbhook.lab import poll
from tests.helpers import bridge_nic, domain_xml, running_fdbhookd
from tests.kernel.test_hook_kernel import REPO, pyroute2_view

pytestmark = pytest.mark.root
RAW_ONLY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netlink_raw_only.py")


@pytest.fixture
def denv(tmp_path):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n[daemon]\nresync_interval = 0.5\n")
    return dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
                FDBHOOK_LOG=str(tmp_path / "log"), FDBHOOK_SOCKET=str(tmp_path / "fdbhookd.sock"),
                PYTHONPATH=REPO)


@pytest.fixture
def daemon(lab, denv):
    """fdbhookd (no libvirt) running inside the lab namespace, with only raw netlink allowed."""
    with running_fdbhookd(lab.exec_argv([sys.executable, RAW_ONLY, "daemon", "--no-libvirt"]), denv) as proc:
        yield proc


def hook(lab, env, op, xml=b"", raw_only=True):
    argv = [sys.executable, RAW_ONLY, "--hook", "qemu", "t1", op, "begin", "-"] if raw_only else \
        [sys.executable, os.path.join(REPO, "hooks", "qemu"), "t1", op, "begin", "-"]
    return subprocess.run(lab.exec_argv(argv), input=xml, env=env, capture_output=True, timeout=60)


def log(env):
    with open(env["FDBHOOK_LOG"]) as handle:
        return handle.read()


def test_hook_served_by_daemon_then_standalone_after_kill(lab, denv, daemon):
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    xml = domain_xml([bridge_nic()])
    result = hook(lab, denv, "start", xml)
    assert result.returncode == 0, result.stderr
    assert "served qemu t1 start" in log(denv) or "fdbhookd" in log(denv)
    assert pyroute2_view(lab, "vnet0") == (False, False, ["52:54:00:00:00:01"])
    pid = daemon.pid
    # the daemon's own log lines carry its pid: the start was applied there
    assert "fdbhook[%d]: qemu/t1: net0" % pid in log(denv)

    daemon.kill()
    daemon.wait(timeout=10)
    result = hook(lab, denv, "stopped")  # socket file is stale: connect refused -> standalone
    assert result.returncode == 0, result.stderr
    assert pyroute2_view(lab, "vnet0") == (True, True, [])
    assert "fdbhook[%d]: qemu/t1" % pid not in log(denv).splitlines()[-1]


def test_failure_reason_travels_through_the_daemon(lab, denv, daemon):
    lab.add_bridge("br0")
    result = hook(lab, denv, "start", domain_xml([bridge_nic(dev="vnet404")]))
    assert result.returncode == 1
    assert result.stderr == b"fdbhook: domain t1: NIC net0 (52:54:00:00:00:01): port vnet404 does not exist\n"


def test_drift_repaired_within_one_interval(lab, denv, daemon):
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    assert hook(lab, denv, "start", domain_xml([bridge_nic()])).returncode == 0
    lab.bridge("link", "set", "dev", "vnet0", "learning", "on", "flood", "on")
    lab.bridge("fdb", "del", "52:54:00:00:00:01", "dev", "vnet0", "master")
    started = time.monotonic()
    assert poll(lambda: pyroute2_view(lab, "vnet0") == (False, False, ["52:54:00:00:00:01"]), timeout=5)
    assert time.monotonic() - started < 2.0  # resync_interval is 0.5 s
    assert "1 repaired" in log(denv)


def test_standalone_hook_with_raw_netlink_only(lab, denv):
    """No daemon at all, and DGRAM netlink refused: the hook still works."""
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    xml = domain_xml([bridge_nic()])
    result = hook(lab, denv, "start", xml)
    assert result.returncode == 0, result.stderr
    assert pyroute2_view(lab, "vnet0") == (False, False, ["52:54:00:00:00:01"])
    assert hook(lab, denv, "stopped").returncode == 0
    assert pyroute2_view(lab, "vnet0") == (True, True, [])


def test_raw_only_wrapper_really_refuses_dgram(lab, denv):
    probe = ("import runpy, sys; sys.argv = ['x', 'status']; "
             "exec(open(%r).read().split('if __name__')[0]); "
             "import socket; socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)") % RAW_ONLY
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, env=denv)
    assert result.returncode != 0 and b"denied" in result.stderr
