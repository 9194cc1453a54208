"""Small builders shared by the unit tests."""

import logging

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
