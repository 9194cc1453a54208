"""EVPN with real libvirt live migration: two libvirt hosts (tests/hostlab.py's Host) joined by VXLAN + FRR.

tests/evpnlab.LibvirtFabric: each host has its own mount/UTS/network
namespace, libvirtd 9.0, fdbhookd and fdbhook's installed hooks, bridge
fxe-br with vxlan100 and FRR's zebra + bgpd inside it (its private /run, so a
plain ``vtysh`` there is that host's FRR). A diskless QEMU guest migrates
A -> B -> A with ``virsh migrate --live`` over a UNIX socket. Kernel state is
read with iproute2, FRR's with vtysh, libvirt's RESUMED with ``virsh event``.
"""

import datetime
import json
import os
import subprocess
import threading
import time

import pytest

from fdbhook.lab import poll

pytestmark = pytest.mark.libvirt

REQUIRED = os.environ.get("FDBHOOK_E2E_REQUIRED") == "1"
MAC = "52:54:00:e2:00:01"
GUEST = "fxe-g1"


@pytest.fixture(scope="module")
def fab():
    from tests.evpnlab import LibvirtFabric, frr_installed

    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, libvirtd)")
    if os.environ.get("FDBHOOK_SKIP_LIBVIRT") == "1" or os.environ.get("FDBHOOK_STACK"):
        pytest.skip("libvirt tier left out (FDBHOOK_SKIP_LIBVIRT=1 or a stack leg)")
    if not frr_installed():
        if REQUIRED and os.environ.get("FDBHOOK_EVPN_REQUIRED") == "1":
            pytest.fail("FRR is not installed although tests/run installed it", pytrace=False)
        pytest.skip("FRR not installed (tests/run installs frr)")
    with LibvirtFabric() as lab:
        yield lab


def resumed_at(events):
    """Wall-clock time of the first 'Resumed' lifecycle event that ``virsh event --timestamp`` printed."""
    for line in events.splitlines():
        if "Resumed" in line and "'%s'" % GUEST in line:
            stamp = line.split(": event", 1)[0].strip()
            return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f%z").timestamp()
    return None


def test_live_migration_there_and_back_moves_the_mac_on_both_hosts(fab, record_property):
    from tests.evpnlab import VXLAN

    a, b = fab.hosts
    a.create(fab.hostlab.diskless_xml(GUEST, MAC, bridge=fab.BRIDGE, tap=fab.TAP))
    # a diskless guest never sends a frame: B can only know it from EVPN
    assert poll(lambda: fab.points_at(b, MAC) == (VXLAN, a.vtep), timeout=10), fab.points_at(b, MAC)
    assert fab.points_at(a, MAC) == fab.TAP
    figures = {}
    for src, dst in ((a, b), (b, a)):
        # no --domain: the guest does not exist on the destination yet
        events = subprocess.Popen(["stdbuf", "-oL", "virsh", "-c", dst.uri, "event", "--event", "lifecycle",
                                   "--loop", "--timestamp"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, env={"PATH": os.environ["PATH"], "LC_ALL": "C"})
        samples, stop = [], threading.Event()

        def moved():
            return fab.points_at(dst, MAC) == fab.TAP and fab.points_at(src, MAC) == (VXLAN, dst.vtep)

        def sample():  # both hosts' FDB, read through the whole migration
            while not stop.is_set():
                samples.append((time.time(), moved()))
        sampler = threading.Thread(target=sample)
        try:
            assert poll(lambda: dst.virsh("list", "--all", check=False).returncode == 0, timeout=10)
            sampler.start()
            fab.migrate(GUEST, src, dst)
            assert poll(moved, timeout=5, interval=0.005), (fab.points_at(src, MAC), fab.points_at(dst, MAC))
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join()
            events.terminate()
            out, _ = events.communicate(timeout=10)
        samples.append((time.time(), moved()))  # the sampler may have stopped just before the poll's success
        # converged: the first sample from which every later one is right
        converged = next(t for i, (t, ok) in enumerate(samples) if all(o for _, o in samples[i:]))
        resumed = resumed_at(out)
        assert resumed is not None, out
        figures["%s->%s" % (src.name, dst.name)] = round((converged - resumed) * 1000, 1)
        assert dst.state(GUEST) == "running" and not src.state(GUEST)
        local, remote = fab.evpn_mac(dst, MAC), fab.evpn_mac(src, MAC)
        assert local["type"] == "local" and local["intf"] == fab.TAP
        assert remote["type"] == "remote" and remote["remoteVtep"] == dst.vtep
        assert not local["isDuplicate"] and not remote["isDuplicate"]
        entry = [e for e in fab.hostlab.ns_json("bridge", dst.ns, "fdb", "show", "br", fab.BRIDGE)
                 if e.get("mac") == MAC and e.get("ifname") == fab.TAP][0]
        assert entry["state"] == "static" and "sticky" not in entry["flags"]
    # fdbhook status inside the host reads that host's FRR with a plain vtysh
    status = a.run(["/opt/fdbhook/bin/fdbhook", "status", "--json"], check=False)
    port = [p for br in json.loads(status.stdout)["bridges"] for p in br["ports"] if p["name"] == fab.TAP][0]
    assert status.returncode == 0 and port["evpn"][MAC]["advertised"], status.stdout
    # sampled with iproute2 on both hosts, about 20 ms a round
    record_property("evpn_libvirt_converged_ms_after_resumed", json.dumps(figures))
    print("converged after libvirt's RESUMED (ms, poll resolution ~20 ms): %s" % figures)
