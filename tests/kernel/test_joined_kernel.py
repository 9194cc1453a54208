"""fdbhookd's link monitor on real ports: a port that joins carrying a known NIC's MAC the libvirt way
(qemu tap: first byte 0xfe; LXC host veth: its peer has the NIC's MAC) is managed with no libvirt event
and no start hook; ports with any other MAC are left as they are."""

import subprocess
import sys

import pytest

from fdbhook.lab import poll
from fdbhook.state import Store
from tests.helpers import bridge_nic, domain_xml
from tests.kernel.test_daemon_kernel import RAW_ONLY, daemon, denv  # noqa: F401 (fixtures)
from tests.kernel.test_hook_kernel import pyroute2_view

pytestmark = pytest.mark.root


def prepare(lab, env, driver, name, xml):
    """The prepare hook, served by fdbhookd: libvirt runs it before it creates the guest's ports."""
    argv = [sys.executable, RAW_ONLY, "--hook", driver, name, "prepare", "begin", "-"]
    result = subprocess.run(lab.exec_argv(argv), input=xml, env=env, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_ports_joining_with_a_known_nic_mac_are_managed_and_foreign_ones_left_alone(lab, denv, daemon):
    lab.add_bridge("br0")
    prepare(lab, denv, "qemu", "t1", domain_xml([bridge_nic(dev=None)], name="t1"))
    prepare(lab, denv, "lxc", "ct1", domain_xml([bridge_nic(mac="52:54:00:00:00:07", dev=None)], name="ct1"))
    # Joined first: an uplink, a tap with a libvirt-style MAC no known NIC has, a tap whose MAC
    # differs from the tap's only in the first byte.
    lab.add_veth("hp-up0", "hp-up0p", bridge="br0", mac="52:54:00:00:00:01")
    lab.add_tap("vnet90", bridge="br0", mac="fe:54:00:00:00:99")
    lab.add_tap("vnet91", bridge="br0", mac="02:54:00:00:00:01")
    # Then the guests' ports, addressed and joined the way libvirt does it.
    lab.add_tap("vnet5", bridge="br0", mac="fe:54:00:00:00:01")
    lab.add_veth("vnet6", "hp-ct1", bridge="br0", mac="52:54:00:00:00:07")
    assert poll(lambda: pyroute2_view(lab, "vnet5") == (False, False, ["52:54:00:00:00:01"])
                and pyroute2_view(lab, "vnet6") == (False, False, ["52:54:00:00:00:07"]), timeout=20)
    # The link monitor takes joins in order: the ports before were decided on first, and left alone,
    # but for vnet90: unmistakably a guest's tap whose NIC nobody knows yet (a hotplug), locked down with
    # the entry its address predicts (fdbhook.lockdown), its original state pending.
    for port in ("hp-up0", "vnet91"):
        assert pyroute2_view(lab, port) == (True, True, []), port
    assert pyroute2_view(lab, "vnet90") == (False, False, ["52:54:00:00:00:99"])
    store = Store(denv["FDBHOOK_STATE_DIR"])
    assert [(p["port"], p["learning"], p["flood"]) for _, p in store.pending()] == [("vnet90", True, True)]
    assert [n.port for n in store.load("qemu", "t1").nics] == ["vnet5"]
    assert [n.port for n in store.load("lxc", "ct1").nics] == ["vnet6"]
