"""EVPN (FRR, Debian's frr package): guests' MACs carried by BGP, so no host floods or learns across the fabric.

Three hosts (tests/evpnlab.py: network namespaces, each with br0 + vxlan100,
zebra + bgpd, fdbhookd without libvirt serving the installed hooks' entry).
Frames are raw Ethernet (0x88B5) from tap "guests"; the wire is read with
packet sockets on the switch ports, VXLAN decoded down to the inner frame.
Kernel state is read with iproute2, FRR's with vtysh: never fdbhook's code.

The live migration here is simulated at the FDB level, as fdbhookd sees it:
the migrate/start/started hooks on the target (ports locked down, no entry),
then fdbhookd's SUSPENDED job on the source and its RESUMED job on the target,
the one right after the other as libvirt's events come.
"""

import json
import os

import pytest

from fdbhook.lab import count_marked, make_frame, poll
from tests.evpnlab import VXLAN, Fabric, frr_installed
from tests.helpers import bridge_nic, domain_xml

# Once tests/run has installed frr (FDBHOOK_EVPN_REQUIRED=1), a missing FRR fails instead of skipping.
pytestmark = [pytest.mark.root, pytest.mark.skipif(not frr_installed() and os.environ.get("FDBHOOK_EVPN_REQUIRED") != "1",
                                                   reason="FRR not installed (tests/run installs frr)")]

G1, G2, G3 = "52:54:00:e0:00:01", "52:54:00:e0:00:02", "52:54:00:e0:00:03"
UNKNOWN = "52:54:00:e0:00:99"


@pytest.fixture
def fabric():
    with Fabric(3) as fab:
        yield fab


def xml(name, mac, dev):
    return domain_xml([bridge_nic(mac=mac, dev=dev)], name=name)


def start_guest(host, name, mac, dev):
    """A tap on host's br0 (QEMU's), then the start hooks: fdbhook manages it."""
    tap = host.lab.add_tap(dev, bridge="br0")
    for op in ("prepare", "start", "started"):
        result = host.hook(name, op, xml(name, mac, dev))
        assert result.returncode == 0, result.stderr
    return tap


def wire_copies(fab, marker, packets=None):
    """{(sending host, outer destination VTEP): frames} of VXLAN packets whose inner frame carries ``marker``.

    ``packets``: what ``fab.collect()`` returned (else it is called now).
    """
    out = {}
    for sender, dst_ip, inner in fab.collect() if packets is None else packets:
        if count_marked([inner], marker):
            out[(sender, dst_ip)] = out.get((sender, dst_ip), 0) + 1
    return out


def send(tap, dst, src, marker, count=10):
    for i in range(count):
        tap.send(make_frame(dst, src, marker + b"%03d" % i))


def test_a_guest_is_known_fabric_wide_before_it_sends_and_frames_to_it_cross_once(fabric):
    """Point 1: B has A's guest as a remote entry before the guest said anything; B -> guest is known unicast."""
    a, b, c = fabric.hosts
    g2 = start_guest(b, "g2", G2, "vnet2")
    g1 = a.lab.add_tap("vnet1", bridge="br0")  # the guest's tap, the guest silent, not managed yet
    fabric.drain()
    send(g2, G1, G2, b"before")
    assert wire_copies(fabric, b"before") == {("b", a.vtep): 10, ("b", c.vtep): 10}  # unknown: flooded to all
    assert count_marked(g1.recv_frames(timeout=0.2), b"before") == 10

    for op in ("prepare", "start", "started"):
        assert a.hook("g1", op, xml("g1", G1, "vnet1")).returncode == 0
    assert poll(lambda: b.points_at(G1) == (VXLAN, a.vtep) and c.points_at(G1) == (VXLAN, a.vtep), timeout=5)
    entry = b.fdb_entry(G1)
    assert entry["ifname"] == VXLAN and "extern_learn" in entry["flags"] and "sticky" not in entry["flags"]
    assert "sticky" not in a.fdb_entry(G1)["flags"]  # sticky = auto: off on a bridge with a VXLAN port

    fabric.drain()
    g1.drain()
    send(g2, G1, G2, b"known")
    assert wire_copies(fabric, b"known") == {("b", a.vtep): 10}  # one copy each, to A only: no flood copy to C
    assert count_marked(g1.recv_frames(timeout=0.2), b"known") == 10


def test_no_frame_for_a_managed_guest_is_flooded_across_the_fabric(fabric):
    """Point 2: every host's guest to every other host's guest: each frame crosses once, to its VTEP."""
    a, b, c = fabric.hosts
    guests = {"a": ("g1", G1, "vnet1"), "b": ("g2", G2, "vnet2"), "c": ("g3", G3, "vnet3")}
    taps = {host.name: start_guest(host, *guests[host.name]) for host in fabric.hosts}
    vtep = {host.name: host.vtep for host in fabric.hosts}
    assert poll(lambda: all(h.points_at(guests[o][1]) == (VXLAN, vtep[o]) for h in fabric.hosts
                            for o in vtep if o != h.name), timeout=5)
    fabric.drain()
    for src, (_, src_mac, _) in guests.items():
        for dst, (_, dst_mac, _) in guests.items():
            if src != dst:
                send(taps[src], dst_mac, src_mac, b"uu-%s%s-" % (src.encode(), dst.encode()))
    packets = fabric.collect()
    for src in guests:
        for dst in guests:
            if src != dst:
                copies = wire_copies(fabric, b"uu-%s%s-" % (src.encode(), dst.encode()), packets)
                assert copies == {(src, vtep[dst]): 10}, (src, dst, copies)
    # The counter does see floods: a MAC nobody manages goes to every other host.
    fabric.drain()
    send(taps["a"], UNKNOWN, G1, b"unknown")
    assert wire_copies(fabric, b"unknown") == {("a", b.vtep): 10, ("a", c.vtep): 10}


def migrate(src, dst, name, mac, dev):
    """Simulated live migration src -> dst at the FDB level, as fdbhookd sees a real one.

    The target's tap exists and its hooks run (migrate marks the incoming
    guest; start/started lock the port down with no entry), then fdbhookd's
    SUSPENDED job on the source and its RESUMED job on the target, back to
    back. Returns (target tap, monotonic time the resume was done).
    """
    tap = dst.lab.add_tap(dev, bridge="br0")
    for op in ("migrate", "prepare", "start", "started"):
        result = dst.hook(name, op, xml(name, mac, dev))
        assert result.returncode == 0, (op, result.stderr)
    assert dst.fdb_entry(mac) is None or dst.fdb_entry(mac)["ifname"] == VXLAN  # nothing before the resume
    src.pause(name)
    _, resumed = dst.resume(name)
    return tap, resumed


def finish_source(src, name, tap):
    """The source guest is gone after the migration: its stop hooks, then QEMU closes the tap."""
    for op in ("stopped", "release"):
        assert src.hook(name, op, xml(name, G1, "vnet1"), sub="end").returncode == 0
    tap.close()


def test_live_migration_moves_the_mac_and_back(fabric):
    """Point 3 (simulated migration): after the resume on B, A and C point the MAC at B, B at the tap; and back."""
    a, b, c = fabric.hosts
    g1 = start_guest(a, "g1", G1, "vnet1")
    g3 = start_guest(c, "g3", G3, "vnet3")
    assert poll(lambda: b.points_at(G1) == (VXLAN, a.vtep) and c.points_at(G1) == (VXLAN, a.vtep), timeout=5)
    for src, dst in ((a, b), (b, a)):
        tap, _ = migrate(src, dst, "g1", G1, "vnet1")

        def moved():
            return (dst.points_at(G1) == "vnet1" and src.points_at(G1) == (VXLAN, dst.vtep)
                    and c.points_at(G1) == (VXLAN, dst.vtep))
        assert poll(moved, timeout=5, interval=0.01), [h.points_at(G1) for h in fabric.hosts]
        assert "sticky" not in dst.fdb_entry(G1)["flags"]
        finish_source(src, "g1", g1)
        g1 = tap
        assert dst.evpn_mac(G1)["type"] == "local" and src.evpn_mac(G1)["remoteVtep"] == dst.vtep
        assert not any(h.evpn_mac(G1)["isDuplicate"] for h in fabric.hosts)  # no duplicate-MAC freeze
        fabric.drain()
        send(g3, G1, G3, b"after-%s" % dst.name.encode())
        assert wire_copies(fabric, b"after-%s" % dst.name.encode()) == {("c", dst.vtep): 10}
        assert count_marked(g1.recv_frames(timeout=0.2), b"after-%s" % dst.name.encode()) == 10
    log = open(a.env["FDBHOOK_LOG"]).read()
    assert "fdb static added" in log and "FAILED" not in log


def test_with_sticky_on_the_mac_cannot_move(fabric):
    """Point 4: why sticky = auto is off on VXLAN bridges.

    zebra advertises a sticky entry as a sticky MAC (it wins every best-path
    selection) and installs it on the other hosts as a static sticky entry on
    the VXLAN port: fdbhook on the target refuses to take that over, so the
    incoming guest's start fails (libvirt would abort the migration). Forcing
    the entry in by hand does not help: the target's zebra ignores it while
    the source advertises, then forgets the MAC, and nobody knows it at all.
    """
    a, b, c = fabric.hosts
    for host in fabric.hosts:
        host.write_config(host.config_text(sticky="yes"))
    g1 = start_guest(a, "g1", G1, "vnet1")
    assert poll(lambda: b.points_at(G1) == (VXLAN, a.vtep), timeout=5)
    assert b.fdb_entry(G1)["flags"] == ["sticky"] and b.fdb_entry(G1)["state"] == "static"
    b.lab.add_tap("vnet1", bridge="br0")
    assert b.hook("g1", "migrate", xml("g1", G1, "vnet1")).returncode == 0
    result = b.hook("g1", "start", xml("g1", G1, "vnet1"))
    assert result.returncode == 1
    assert b"already has a static FDB entry on another port" in result.stderr and b"refusing to move" in result.stderr

    a.pause("g1")
    b.lab.bridge("fdb", "replace", G1, "dev", "vnet1", "master", "static", "sticky")
    assert poll(lambda: a.points_at(G1) is None and c.points_at(G1) is None, timeout=5)  # A's withdrawal
    # ... and B's entry is never advertised: for 3 s neither A nor C learns where the guest is.
    assert not poll(lambda: a.points_at(G1) is not None or c.points_at(G1) is not None, timeout=3)
    assert b.evpn_mac(G1) is None and a.evpn_mac(G1) is None  # FRR on no host knows where the guest is
    g1.close()


def status_json(host):
    result = host.cli("status", "--json")
    return result.returncode, json.loads(result.stdout)


def test_status_shows_what_evpn_advertised_and_flags_what_frr_does_not_know(fabric):
    """Point 5: fdbhook status reads FRR's view (vtysh -N, the host's FRR) next to the kernel's."""
    a, b, c = fabric.hosts
    start_guest(a, "g1", G1, "vnet1")
    start_guest(a, "g4", "52:54:00:e0:00:04", "vnet4")
    assert poll(lambda: (a.evpn_mac(G1) or {}).get("type") == "local", timeout=5)
    code, data = status_json(a)
    ports = {p["name"]: p for p in data["bridges"][0]["ports"]}
    assert code == 0 and ports["vnet1"]["evpn"][G1]["advertised"] and ports["vnet1"]["evpn"][G1]["vni"] == [100]
    assert data["bridges"][0]["sticky"]["on"] is False and "VXLAN port vxlan100" in data["bridges"][0]["sticky"]["why"]
    text = a.cli("status").stdout
    assert "EVPN: %s advertised (VNI 100, sequence 0)" % G1 in text

    a.lab.bridge("fdb", "del", "52:54:00:e0:00:04", "dev", "vnet4", "master")  # behind fdbhook's back
    assert poll(lambda: a.evpn_mac("52:54:00:e0:00:04") is None, timeout=5)
    code, data = status_json(a)
    ports = {p["name"]: p for p in data["bridges"][0]["ports"]}
    assert code == 4 and ports["vnet4"]["evpn"]["52:54:00:e0:00:04"]["problem"] == "not known to FRR"
    assert "EVPN: 52:54:00:e0:00:04 NOT advertised: not known to FRR" in a.cli("status").stdout
    explain = a.cli("explain", "br0").stdout
    assert "guest entries not sticky: sticky = auto ([manage]): off, br0 has VXLAN port vxlan100" in explain
