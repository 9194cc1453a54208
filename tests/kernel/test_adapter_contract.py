"""Kernel tier: the fake adapter (tests/fakes.py) and the real one answer the same write scenarios alike.

The real kernel handles every message of one send and goes on after a failed
one; the adapter therefore sends an entry and what depends on it in separate
stages. Each scenario runs against both; the real one is checked with
iproute2, the fake with its dicts.
"""

import pytest

from fdbhook.errors import KernelError
from fdbhook.model import Op
from tests.fakes import FakeKernel

pytestmark = pytest.mark.root

MAC1, MAC2, MISSING = "52:54:00:00:0d:01", "52:54:00:00:0d:02", "52:54:00:00:0d:99"


class Fake:
    def __init__(self):
        self.kernel = FakeKernel.bridge_with_ports("br0", ("vnet0",))
        self.port, self.bridge = 11, 10

    def observe(self):
        link = self.kernel.by_index(self.port)
        statics = sorted(e.mac for e in self.kernel.entries.values() if e.ifindex == self.port and e.static)
        return link.learning, link.flood, statics

    def close(self):
        pass


class Real:
    def __init__(self, lab):
        from fdbhook.kernel import Kernel
        from fdbhook.lab import in_netns

        self.lab = lab
        lab.add_bridge("br0")
        lab.add_tap("vnet0", bridge="br0")
        with in_netns(lab.ns):
            self.kernel = Kernel()
            self.kernel._netlink()  # the socket lives in the lab's namespace
        self.port = int(lab.link("vnet0")["ifindex"])
        self.bridge = int(lab.link("br0")["ifindex"])

    def observe(self):
        flags = self.lab.port_flags("vnet0")
        statics = sorted(e["mac"] for e in self.lab.fdb(dev="vnet0") if e["state"] == "static")
        return bool(flags["learning"]), bool(flags["flood"]), statics

    def close(self):
        self.kernel.close()


@pytest.fixture(params=["fake", "real"])
def adapter(request):
    side = Fake() if request.param == "fake" else Real(request.getfixturevalue("lab"))
    yield side
    side.close()


def ops(side, *specs):
    common = dict(port="vnet0", ifindex=side.port, bridge="br0", bridge_ifindex=side.bridge)
    return [Op(kind=kind, **dict(common, **kw)) for kind, kw in specs]


def test_a_failed_entry_stops_what_depends_on_it_but_not_its_own_stage(adapter):
    with pytest.raises(KernelError) as err:
        adapter.kernel.execute_many(ops(adapter, ("fdb_replace", dict(mac=MAC1, vlan=42)),  # VLAN not on the port
                                        ("fdb_replace", dict(mac=MAC2)),
                                        ("set_flags", dict(learning=False, flood=False)), ("flush", {})))
    assert "errno 22" in str(err.value) and MAC1 in str(err.value)
    assert adapter.observe() == (True, True, [MAC2])


def test_a_whole_plan_goes_in_when_every_stage_succeeds(adapter):
    adapter.kernel.execute_many(ops(adapter, ("fdb_replace", dict(mac=MAC1, sticky=True)),
                                    ("set_flags", dict(learning=False, flood=False)), ("flush", {})))
    assert adapter.observe() == (False, False, [MAC1])
    adapter.kernel.execute_many(ops(adapter, ("set_flags", dict(flood=True)), ("fdb_del", dict(mac=MAC1)),
                                    ("fdb_del", dict(mac=MISSING)), ("set_flags", dict(learning=True))))
    assert adapter.observe() == (True, True, [])


def test_a_failed_first_stage_of_a_teardown_keeps_the_entries(adapter):
    adapter.kernel.execute_many(ops(adapter, ("fdb_replace", dict(mac=MAC1)),
                                    ("set_flags", dict(learning=False, flood=False))))
    with pytest.raises(KernelError):
        adapter.kernel.execute_many(ops(adapter, ("fdb_replace", dict(mac=MAC2, vlan=42)),
                                        ("set_flags", dict(flood=True)),
                                        ("fdb_del", dict(mac=MAC1)), ("set_flags", dict(learning=True))))
    assert adapter.observe() == (False, True, [MAC1])


def test_a_port_that_is_gone_is_an_error_naming_the_op(adapter):
    gone = [Op(kind="fdb_replace", mac=MAC1, port="vnet9", ifindex=999, bridge="br0", bridge_ifindex=adapter.bridge)]
    with pytest.raises(KernelError) as err:
        adapter.kernel.execute_many(gone)
    assert "vnet9" in str(err.value) and "errno 19" in str(err.value)
    adapter.kernel.execute_many([Op(kind="fdb_del", mac=MAC1, port="vnet9", ifindex=999, bridge="br0",
                                    bridge_ifindex=adapter.bridge)])  # nothing to delete: fine


def test_announce_has_the_bridge_notify_an_entry_again_without_changing_it(lab):
    """What fdbhookd does when FRR's zebra missed a new tap's entry (engine.announce_to_frr)."""
    import socket

    from fdbhook.kernel import Kernel
    from fdbhook.lab import in_netns
    from fdbhook.model import FdbEntry

    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    lab.bridge("fdb", "add", MAC1, "dev", "vnet0", "master", "static", "sticky")
    before = [e for e in lab.fdb(dev="vnet0") if e["mac"] == MAC1]
    port = int(lab.link("vnet0")["ifindex"])
    with in_netns(lab.ns):
        listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        kernel = Kernel()
        kernel._netlink()
    try:
        listener.bind((0, 1 << (3 - 1)))  # RTNLGRP_NEIGH, as zebra listens
        entries = [e for e in kernel.port_entries(port) if e.mac == MAC1]
        assert [(e.static, e.sticky) for e in entries] == [(True, True)]
        assert kernel.announce(entries) == 1
        # gone meanwhile: not created again
        assert kernel.announce([FdbEntry(mac=MISSING, ifindex=port, static=True, local=False)]) == 0
        listener.settimeout(30)
        notice = listener.recv(65536)
    finally:
        kernel.close()
        listener.close()
    assert bytes.fromhex(MAC1.replace(":", "")) in notice  # RTM_NEWNEIGH of our entry, sent again
    assert [e for e in lab.fdb(dev="vnet0") if e["mac"] == MAC1] == before
    assert not [e for e in lab.fdb(dev="vnet0") if e["mac"] == MISSING]
