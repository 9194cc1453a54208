"""Small builders and process helpers shared by the tests."""

import contextlib
import logging
import os
import subprocess

from fdbhook.config import parse_config

MANAGE_BR = "[manage]\nbridges = br0 br-*\nnetworks = isolated*\n"


def config(text=MANAGE_BR, **env):
    env.setdefault("FDBHOOK_STATE_DIR", "/nonexistent-state")
    env.setdefault("FDBHOOK_LIBVIRT_NETWORK_DIRS", "/nonexistent-net")
    return parse_config(text, path="test.conf", env=env)


def domain_xml(nics, name="t1", dtype="kvm", metadata=""):
    return ("<domain type='%s'><name>%s</name><uuid>00000000-0000-0000-0000-000000000001</uuid>"
            "%s<devices>%s</devices></domain>" % (dtype, name, metadata, "".join(nics))).encode()


def bridge_nic(mac="52:54:00:00:00:01", bridge="br0", dev="vnet0", alias="net0"):
    target = "<target dev='%s'/>" % dev if dev else ""
    return ("<interface type='bridge'><mac address='%s'/><source bridge='%s'/>%s<alias name='%s'/>"
            "</interface>" % (mac, bridge, target, alias))


def network_nic(mac="52:54:00:00:00:02", network="isolated1", bridge=None, dev="vnet1", mtm=None):
    src = "<source network='%s'%s%s/>" % (network, " bridge='%s'" % bridge if bridge else "",
                                          " macTableManager='%s'" % mtm if mtm else "")
    target = "<target dev='%s'/>" % dev if dev else ""
    return "<interface type='network'><mac address='%s'/>%s%s</interface>" % (mac, src, target)


class LogRecords(logging.Handler):
    """Collects the records of one fdbhook logger (it may not propagate to pytest's caplog once set up)."""

    def __init__(self, name):
        super().__init__()
        self.records = []
        self.logger = logging.getLogger(name)

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.logger.addHandler(self)
        return self.records

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def stop_process(proc, timeout=15):
    """Terminate a child, kill it if it is still there after ``timeout`` s; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@contextlib.contextmanager
def running_fdbhookd(argv, env, timeout=30):
    """fdbhookd from ``argv`` (``env`` names its socket and log) until the block ends; fails the test
    with the daemon's first output if its socket does not appear."""
    import pytest

    from fdbhook.lab import poll

    with open(env["FDBHOOK_LOG"] + ".out", "w+b") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        if not poll(lambda: os.path.exists(env["FDBHOOK_SOCKET"]) or proc.poll() is not None, timeout=timeout) \
                or proc.poll() is not None:
            proc.kill()
            proc.wait(timeout=10)
            out.seek(0)
            pytest.fail("fdbhookd did not come up: %s" % out.read(2000).decode(errors="replace"))
        try:
            yield proc
        finally:
            if proc.poll() is None:
                stop_process(proc, timeout=30)


def unit_nice(tree=None):
    """The ``Nice=`` of ``tree``'s fdbhookd.service (0 without one): systemd starts fdbhookd at it, and so
    do the labs and benchmarks that start it by hand."""
    tree = tree or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        with open(os.path.join(tree, "fdbhookd.service")) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return 0
    return next((int(line.split("=", 1)[1]) for line in lines if line.startswith("Nice=")), 0)
