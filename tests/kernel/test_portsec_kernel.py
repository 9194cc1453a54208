"""Kernel tier: extra MACs, lock mode (locked ports) and MAB, with raw frames through real bridges.

The hook runs as a subprocess in the lab's namespace (as in test_hook_kernel);
results are read with iproute2's JSON and counted with raw frames (ethertype
0x88B5). This machine's kernel (6.18) has locked ports and MAB.
"""

import json

import pytest

from fdbhook.lab import count_marked, make_frame, poll
from tests.helpers import bridge_nic, domain_xml
from tests.kernel.test_hook_kernel import WAN, cli, env, hook, static_entries  # noqa: F401 (env: fixture)

pytestmark = pytest.mark.root

VRRP = "00:00:5e:00:01:0a"
INNER = "02:00:00:00:10:01"
FORGED = "02:66:66:66:66:66"
MACS = {"vnet%d" % i: "52:54:00:00:02:%02x" % i for i in range(3)}


def meta(**per_port):
    items = "".join("<fdb:interface mac='%s' %s/>" % (MACS[p], attrs) for p, attrs in per_port.items())
    return "<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>%s</fdb:fdb></metadata>" % items


def build(lab):
    lab.add_bridge("br0")
    wan = lab.add_veth("uplink", "wan", bridge="br0", mac=WAN)
    guests = {p: lab.add_tap(p, bridge="br0") for p in MACS}
    return wan, guests


def domain(metadata):
    return domain_xml([bridge_nic(mac=MACS[p], dev=p, alias="net" + p[-1]) for p in MACS], metadata=metadata)


def counts(ends, marker):
    return {name: count_marked(end.recv_frames(timeout=0.2), marker) for name, end in ends.items()}


def settle(ends):
    for end in ends.values():
        end.recv_frames(timeout=0.1)


def test_extra_macs_reach_their_guest_only_and_go_at_teardown(lab, env):
    wan, guests = build(lab)
    xml = domain(meta(vnet1="extra-macs='%s %s'" % (VRRP, INNER)))
    result = hook(lab, env, "qemu", "t1", "start", xml)
    assert result.returncode == 0, result.stderr
    entries = static_entries(lab)
    for mac in (MACS["vnet1"], VRRP, INNER):
        assert entries[mac]["ifname"] == "vnet1" and "sticky" in entries[mac]["flags"], mac
    for mac, marker in ((VRRP, b"vrrp"), (INNER, b"inner")):
        for _ in range(5):
            wan.send(make_frame(mac, WAN, marker))
        assert counts(guests, marker) == {"vnet0": 0, "vnet1": 5, "vnet2": 0}, mac
    status = cli(lab, env, "status", "--json")
    assert status.returncode == 0, status.stdout
    ports = {p["name"]: p for p in json.loads(status.stdout)["bridges"][0]["ports"]}
    assert ports["vnet1"]["extra_macs"] == [VRRP, INNER] and ports["vnet1"]["drift"] == []

    lab.bridge("fdb", "del", VRRP, "dev", "vnet1", "master")
    drift = cli(lab, env, "status")
    assert drift.returncode == 4 and VRRP.encode() in drift.stdout

    assert hook(lab, env, "qemu", "t1", "stopped").returncode == 0
    assert static_entries(lab) == {}
    for _ in range(5):
        wan.send(make_frame(INNER, WAN, b"after"))
    assert counts(guests, b"after") == {p: 5 for p in guests}  # unknown again: flooded to all


def test_lock_mode_drops_forged_sources_and_unlocks_at_teardown(lab, env):
    wan, guests = build(lab)
    open(env["FDBHOOK_CONF"], "a").write("locked = yes\n")
    xml = domain(meta(vnet2="extra-macs='%s'" % VRRP))
    result = hook(lab, env, "qemu", "t1", "start", xml)
    assert result.returncode == 0, result.stderr
    for port in guests:
        flags = lab.port_flags(port)
        assert (flags["locked"], flags["learning"], flags["flood"]) == (True, False, False), port
    assert lab.port_flags("uplink")["locked"] is False  # not ours
    others = dict(guests, wan=wan)
    del others["vnet2"]
    settle(others)

    # Forged source: to the uplink's MAC and broadcast, nobody gets anything.
    for _ in range(10):
        guests["vnet2"].send(make_frame(WAN, FORGED, b"forged-u"))
        guests["vnet2"].send(make_frame("ff:ff:ff:ff:ff:ff", FORGED, b"forged-b"))
        guests["vnet2"].send(make_frame(MACS["vnet0"], MACS["vnet0"], b"forged-v"))  # a victim's MAC
    for marker in (b"forged-u", b"forged-b", b"forged-v"):
        assert counts(others, marker) == {name: 0 for name in others}, marker
    assert static_entries(lab)[MACS["vnet0"]]["ifname"] == "vnet0"
    # Its own MAC and its extra MAC pass.
    for src, marker in ((MACS["vnet2"], b"own"), (VRRP, b"extra")):
        for _ in range(5):
            guests["vnet2"].send(make_frame(WAN, src, marker))
        assert counts({"wan": wan}, marker) == {"wan": 5}, marker

    assert hook(lab, env, "qemu", "t1", "stopped").returncode == 0
    for port in guests:
        flags = lab.port_flags(port)
        assert (flags["locked"], flags["learning"], flags["flood"]) == (False, True, True), port
    for _ in range(5):
        guests["vnet2"].send(make_frame(WAN, FORGED, b"free"))
    assert counts({"wan": wan}, b"free") == {"wan": 5}


def test_mab_shows_the_source_macs_a_locked_port_dropped(lab, env):
    wan, guests = build(lab)
    open(env["FDBHOOK_CONF"], "a").write("locked = yes\nmab = yes\n")
    result = hook(lab, env, "qemu", "t1", "start", domain(""))
    assert result.returncode == 0, result.stderr
    flags = lab.port_flags("vnet0")
    assert (flags["locked"], flags["learning"], flags["flood"]) == (True, True, False)  # iproute2 6.1 shows no mab
    for _ in range(3):
        guests["vnet0"].send(make_frame(WAN, FORGED, b"tries"))
    assert counts({"wan": wan}, b"tries") == {"wan": 0}
    # A locked port without MAB learns nothing; with it the bridge keeps a
    # "locked" entry for the dropped source (iproute2 6.1 lists it, unflagged).
    assert poll(lambda: any(e["mac"] == FORGED for e in lab.fdb(dev="vnet0")))

    status = cli(lab, env, "status", "--json")
    assert status.returncode == 0, status.stdout
    ports = {p["name"]: p for p in json.loads(status.stdout)["bridges"][0]["ports"]}
    assert ports["vnet0"]["dropped_macs"] == [FORGED] and ports["vnet1"]["dropped_macs"] == []
    text = cli(lab, env, "status").stdout.decode()
    assert "dropped source MACs (MAB): %s" % FORGED in text
    explained = cli(lab, env, "explain", "br0").stdout.decode()
    assert "keeps learning on purpose (MAB reports dropped MACs)" in explained

    assert hook(lab, env, "qemu", "t1", "stopped").returncode == 0
    flags = lab.port_flags("vnet0")
    assert (flags["locked"], flags["learning"], flags["flood"]) == (False, True, True)
