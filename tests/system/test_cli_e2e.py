"""The admin's CLI against a running libvirtd: apply/teardown by domain name."""

import pytest

from tests.system import libvirt_env as E

pytestmark = [pytest.mark.libvirt, pytest.mark.root]
FDBHOOK = "/opt/fdbhook/bin/fdbhook"


def test_apply_by_name_looks_the_domain_up_in_libvirt(guests):
    mac = "52:54:00:e5:00:01"
    name = guests.define("qemu", E.PFX + "-cli", [E.nic_bridge(mac, E.BR)])
    guests.start("qemu", name)
    dev = E.dev_of(E.QEMU, name, mac)
    assert E.run(FDBHOOK, "teardown", name).returncode == 0
    assert E.port(dev)["learning"] is True and not E.static_entries(E.BR, mac)
    dry = E.run(FDBHOOK, "apply", name, "--dry-run")
    assert "bridge fdb replace %s dev %s master static sticky" % (mac, dev) in dry.stdout
    assert E.port(dev)["learning"] is True
    assert E.run(FDBHOOK, "apply", name).returncode == 0
    assert E.port(dev)["learning"] is False and E.static_entries(E.BR, mac)
    missing = E.run(FDBHOOK, "apply", E.PFX + "-nosuch", check=False)
    assert missing.returncode == 3
    assert missing.stderr.strip().count("\n") == 0 and "Domain not found" in missing.stderr
