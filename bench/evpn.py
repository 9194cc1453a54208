"""EVPN benchmark (issue 12): convergence after a live migration, and floods across the fabric.

    sudo PYTHONPATH=. /opt/fdbhook/bin/python3 bench/evpn.py [--migrations 10] [--frames 1000] [--dad SPEC]

Three hosts of tests/evpnlab.py (network namespaces, br0 + vxlan100, FRR 8.4's
zebra + bgpd each, iBGP EVPN; fdbhookd without libvirt). A guest's tap moves
A -> B -> A ... by simulated live migration at the FDB level: the target's
migrate/start/started hooks (port locked down, no entry), then fdbhookd's
SUSPENDED job on the source and its RESUMED job on the target, back to back
(what libvirt's events make fdbhookd do). Convergence: from the end of the
resume job to every host's FDB right (the target's bridge points the MAC at
the guest's tap, both others' at their VXLAN port with the target's VTEP),
read with netlink sockets in each namespace every millisecond.

Floods: after each migration a guest on the third host sends ``--frames``
raw frames to the migrated guest, and every VXLAN packet on the wire is
decoded: copies to a VTEP other than the guest's are floods (target 0).

``--dad``: FRR's ``dup-addr-detection`` line (default: FRR's own default, 5
moves in 180 s, warning only). Prints a table, writes bench/results/evpn.json.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from fdbhook.lab import count_marked, in_netns, make_frame, poll  # noqa: E402
from tests.evpnlab import BRIDGE, VXLAN, Fabric  # noqa: E402
from tests.helpers import bridge_nic, domain_xml  # noqa: E402

GUEST = "52:54:00:e0:00:01"
PEER = "52:54:00:e0:00:03"
NTF_SELF = 0x02


class FdbReader:
    """Fast reads of one host's FDB for one MAC: an IPRoute socket opened inside the host's namespace."""

    def __init__(self, host, bridge=BRIDGE):
        from pyroute2 import IPRoute

        self.bridge = bridge
        with in_netns(host.ns):
            self.ipr = IPRoute()
        self.index = {link.get_attr("IFLA_IFNAME"): link["index"] for link in self.ipr.get_links()}

    def refresh(self):
        self.index = {link.get_attr("IFLA_IFNAME"): link["index"] for link in self.ipr.get_links()}

    def points_at(self, mac):
        """The port name of the bridge's entry for ``mac``, with the VTEP for the VXLAN port."""
        names = {i: n for n, i in self.index.items()}
        port = None
        try:
            msgs = self.ipr.fdb("get", ifindex=0, lladdr=mac, master=self.index[self.bridge])
        except Exception:
            return None
        for msg in msgs:
            if not msg["flags"] & NTF_SELF:
                port = names.get(msg["ifindex"])
        if port != VXLAN:
            return port
        for msg in self.ipr.fdb("dump", ifindex=self.index[VXLAN]):
            if msg["flags"] & NTF_SELF and msg.get_attr("NDA_LLADDR") == mac and msg["ifindex"] == self.index[VXLAN]:
                return (VXLAN, msg.get_attr("NDA_DST"))
        return (VXLAN, None)

    def close(self):
        self.ipr.close()


def xml(mac, dev):
    return domain_xml([bridge_nic(mac=mac, dev=dev)], name="g1" if mac == GUEST else "g3")


def start(host, mac, dev, name):
    tap = host.lab.add_tap(dev, bridge=BRIDGE)
    for op in ("prepare", "start", "started"):
        result = host.hook(name, op, xml(mac, dev))
        if result.returncode:
            raise SystemExit("%s %s on %s: %s" % (name, op, host.name, result.stderr.decode().strip()))
    return tap


def migrate_once(fab, readers, src, dst, tap_src):
    """One migration src -> dst; returns (convergence s, target tap, pause->resume gap s)."""
    tap = dst.lab.add_tap("vnet1", bridge=BRIDGE)
    for op in ("migrate", "prepare", "start", "started"):
        result = dst.hook("g1", op, xml(GUEST, "vnet1"))
        if result.returncode:
            raise SystemExit("incoming %s on %s: %s" % (op, dst.name, result.stderr.decode().strip()))
    for reader in readers.values():
        reader.refresh()
    _, paused = src.pause("g1")
    resumed_at, resumed = dst.resume("g1")
    want = {h.name: ("vnet1" if h is dst else (VXLAN, dst.vtep)) for h in fab.hosts}

    def right():
        return all(readers[name].points_at(GUEST) == where for name, where in want.items())
    if not poll(right, timeout=10, interval=0.001):
        raise SystemExit("no convergence after %s -> %s: %s" % (
            src.name, dst.name, {n: r.points_at(GUEST) for n, r in readers.items()}))
    converged = time.monotonic() - resumed
    for op in ("stopped", "release"):
        src.hook("g1", op, xml(GUEST, "vnet1"), sub="end")
    tap_src.close()
    return converged, tap, resumed_at - paused


def floods(fab, sender, dst, tap, frames, tag):
    """(copies to the guest's VTEP, copies anywhere else, frames the guest's tap got) of ``frames`` sent to it."""
    fab.drain()
    tap.drain()
    marker = b"evpn-%s" % tag
    for i in range(frames):
        sender.send(make_frame(GUEST, PEER, marker + b"%05d" % i))
    right = wrong = 0
    for _, dst_ip, inner in fab.collect(quiet=0.3):
        if count_marked([inner], marker):
            if dst_ip == dst.vtep:
                right += 1
            else:
                wrong += 1
    return right, wrong, count_marked(tap.recv_frames(timeout=0.2), marker)


def announce(fab, readers, count):
    """Seconds from each of ``count`` guests' start hook returning on A to both other hosts pointing at A."""
    a = fab.hosts[0]
    out = []
    for i in range(count):
        mac, dev = "52:54:00:e1:00:%02x" % i, "vnet%d" % (10 + i)
        a.lab.add_tap(dev, bridge=BRIDGE)
        for op in ("prepare", "start"):
            result = a.hook("s%d" % i, op, domain_xml([bridge_nic(mac=mac, dev=dev)], name="s%d" % i))
            if result.returncode:
                raise SystemExit("s%d %s: %s" % (i, op, result.stderr.decode().strip()))
        done = time.monotonic()
        if not poll(lambda: all(readers[h.name].points_at(mac) == (VXLAN, a.vtep) for h in fab.hosts[1:]),
                    timeout=10, interval=0.001):
            raise SystemExit("guest s%d never became known fabric-wide" % i)
        out.append(time.monotonic() - done)
    return out


def run_libvirt(args):
    """Real live migrations (tests/evpnlab.LibvirtFabric): convergence after libvirt's RESUMED on the target."""
    import datetime
    import threading

    from tests.evpnlab import LibvirtFabric

    rows = []
    with LibvirtFabric() as fab:
        a, b = fab.hosts
        readers = {h.name: FdbReader(h, fab.BRIDGE) for h in fab.hosts}
        try:
            a.create(fab.hostlab.diskless_xml("fxe-g1", GUEST, bridge=fab.BRIDGE, tap=fab.TAP))
            if not poll(lambda: readers["b"].points_at(GUEST) == (VXLAN, a.vtep), timeout=10):
                raise SystemExit("B never learned the guest from EVPN")
            src, dst = a, b
            for i in range(args.migrations):
                events = subprocess.Popen(["stdbuf", "-oL", "virsh", "-c", dst.uri, "event", "--event", "lifecycle",
                                           "--loop", "--timestamp"], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True)
                poll(lambda: dst.virsh("list", check=False).returncode == 0, timeout=10)
                samples, stop = [], threading.Event()
                want = {src.name: (VXLAN, dst.vtep), dst.name: fab.TAP}

                def right():
                    return all(readers[n].points_at(GUEST) == w for n, w in want.items())

                def sample():
                    while not stop.is_set():
                        for reader in readers.values():
                            reader.refresh()  # the target's tap appears during the migration
                        samples.append((time.time(), right()))
                        time.sleep(0.001)
                thread = threading.Thread(target=sample)
                thread.start()
                started = time.monotonic()
                try:
                    fab.migrate("fxe-g1", src, dst)
                    took = time.monotonic() - started
                    ok = poll(right, timeout=10, interval=0.001)
                finally:
                    stop.set()
                    thread.join()
                    events.terminate()
                    out, _ = events.communicate(timeout=10)
                if not ok:
                    raise SystemExit("no convergence after %s -> %s" % (src.name, dst.name))
                for reader in readers.values():
                    reader.refresh()
                samples.append((time.time(), right()))
                converged = next(t for j, (t, good) in enumerate(samples) if all(g for _, g in samples[j:]))
                resumed = None
                for line in out.splitlines():
                    if "Resumed" in line and "'fxe-g1'" in line:
                        stamp = line.split(": event", 1)[0].strip()
                        resumed = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f%z").timestamp()
                        break
                if resumed is None:
                    raise SystemExit("no RESUMED event on %s: %r" % (dst.name, out))
                dup = [h.name for h in fab.hosts if (fab.evpn_mac(h, GUEST) or {}).get("isDuplicate")]
                rows.append({"migration": i + 1, "from": src.name, "to": dst.name,
                             "convergence_ms": round((converged - resumed) * 1000, 2),
                             "virsh_migrate_s": round(took, 2), "frr_duplicate": dup, "samples": len(samples)})
                print("migration %2d %s -> %s (virsh migrate %.2f s): converged %7.1f ms after RESUMED%s" % (
                    i + 1, src.name, dst.name, took, (converged - resumed) * 1000,
                    "; FRR flags the MAC duplicate on " + ",".join(dup) if dup else ""), flush=True)
                src, dst = dst, src
        finally:
            for reader in readers.values():
                reader.close()
    return rows


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


def frr_version():
    try:
        out = subprocess.run(["/usr/lib/frr/zebra", "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def run(args):
    rows = []
    with Fabric(3, dad=args.dad) as fab:
        a, b, c = fab.hosts
        readers = {h.name: FdbReader(h) for h in fab.hosts}
        try:
            peer_tap = start(c, PEER, "vnet3", "g3")
            known = announce(fab, readers, args.migrations)
            tap = start(a, GUEST, "vnet1", "g1")
            if not poll(lambda: readers["b"].points_at(GUEST) == (VXLAN, a.vtep), timeout=10):
                raise SystemExit("B never learned the guest from EVPN")
            src, dst = a, b
            for i in range(args.migrations):
                converged, tap, gap = migrate_once(fab, readers, src, dst, tap)
                right, wrong, got = floods(fab, peer_tap, dst, tap, args.frames, b"%02d" % i)
                dup = [h.name for h in fab.hosts if (h.evpn_mac(GUEST) or {}).get("isDuplicate")]
                rows.append({"migration": i + 1, "from": src.name, "to": dst.name,
                             "convergence_ms": round(converged * 1000, 2), "pause_resume_gap_ms": round(gap * 1000, 3),
                             "frames": args.frames, "to_guest_vtep": right, "flooded": wrong, "delivered": got,
                             "frr_duplicate": dup})
                print("migration %2d %s -> %s: converged %7.1f ms after the resume; %d/%d frames to %s (%d delivered), "
                      "%d flooded%s" % (i + 1, src.name, dst.name, converged * 1000, right, args.frames, dst.name, got,
                                        wrong,
                         "; FRR flags the MAC duplicate on " + ",".join(dup) if dup else ""), flush=True)
                src, dst = dst, src
        finally:
            for reader in readers.values():
                reader.close()
    return rows, known


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=10)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--dad", default=None, help="FRR dup-addr-detection arguments, e.g. 'max-moves 50 time 180'")
    parser.add_argument("--libvirt", action="store_true",
                        help="real live migrations of a diskless QEMU guest between two libvirt hosts (tests/hostlab.py)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/evpn.py: needs root")
    started = time.monotonic()
    if args.libvirt:
        return main_libvirt(args, started)
    rows, known = run(args)
    conv = [r["convergence_ms"] for r in rows]
    sent = sum(r["frames"] for r in rows)
    flooded = sum(r["flooded"] for r in rows)
    delivered = sum(r["delivered"] for r in rows)
    summary = {"migrations": len(rows), "convergence_ms_p50": round(statistics.median(conv), 1),
               "convergence_ms_p99": round(pct(conv, 99), 1), "convergence_ms_max": round(max(conv), 1),
               "frames_sent": sent, "delivered": delivered, "crossed_once": sum(r["to_guest_vtep"] for r in rows),
               "flooded": flooded, "flooded_per_1000": round(1000.0 * flooded / sent, 3),
               "frr_duplicate_flagged_after": next((r["migration"] for r in rows if r["frr_duplicate"]), None),
               "target_p99_ms": 1000, "target_flooded_per_1000": 0,
               "known_after_start_ms_p50": round(statistics.median(known) * 1000, 1),
               "known_after_start_ms_p99": round(pct(known, 99) * 1000, 1)}
    print()
    print("EVPN, 3 hosts (%s), %d simulated live migrations A <-> B" % (frr_version() or "FRR", len(rows)))
    print("  a new guest on A known to B and C after its start hook: p50 %.1f ms, p99 %.1f ms (%d guests)"
          % (summary["known_after_start_ms_p50"], summary["known_after_start_ms_p99"], len(known)))
    print("  convergence after the resume (every host's FDB right): p50 %.1f ms, p99 %.1f ms, max %.1f ms"
          % (summary["convergence_ms_p50"], summary["convergence_ms_p99"], summary["convergence_ms_max"]))
    print("  frames sent to the guest from host C: %d; crossed the wire once, to its VTEP: %d; delivered: %d"
          % (sent, summary["crossed_once"], delivered))
    print("  frames flooded across the wire: %d of %d (%.3f per 1,000)" % (flooded, sent, summary["flooded_per_1000"]))
    if summary["frr_duplicate_flagged_after"]:
        print("  FRR's duplicate address detection flagged the MAC after migration %d (%s)"
              % (summary["frr_duplicate_flagged_after"], "dup-addr-detection " + args.dad if args.dad
                 else "FRR default: 5 moves in 180 s, warning only"))
    print("targets")
    print("  convergence p99 (ms)          %8.1f  target <= 1000  %s" % (
        summary["convergence_ms_p99"], "met" if summary["convergence_ms_p99"] <= 1000 else "MISSED"))
    print("  flooded per 1,000 frames      %8.3f  target 0        %s" % (
        summary["flooded_per_1000"], "met" if flooded == 0 else "MISSED"))
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "evpn.json"), "w") as handle:
        json.dump({"machine": {"kernel": platform.release(), "python": platform.python_version(),
                               "frr": frr_version(), "cpus": os.cpu_count()},
                   "dad": args.dad, "summary": summary, "rows": rows,
                   "known_after_start_ms": [round(k * 1000, 2) for k in known],
                   "seconds": round(time.monotonic() - started, 1)}, handle, indent=2)
    print("wrote bench/results/evpn.json (%.0f s)" % (time.monotonic() - started))


def main_libvirt(args, started):
    rows = run_libvirt(args)
    conv = [r["convergence_ms"] for r in rows]
    summary = {"migrations": len(rows), "convergence_ms_p50": round(statistics.median(conv), 1),
               "convergence_ms_p99": round(pct(conv, 99), 1), "convergence_ms_max": round(max(conv), 1),
               "frr_duplicate_flagged_after": next((r["migration"] for r in rows if r["frr_duplicate"]), None),
               "target_p99_ms": 1000}
    print()
    print("EVPN, 2 libvirt hosts (%s, libvirt 9.0), %d live migrations A <-> B (virsh migrate --live)"
          % (frr_version() or "FRR", len(rows)))
    print("  convergence after libvirt's RESUMED on the target (both hosts' FDB right): p50 %.1f ms, p99 %.1f ms, "
          "max %.1f ms" % (summary["convergence_ms_p50"], summary["convergence_ms_p99"], summary["convergence_ms_max"]))
    print("targets")
    print("  convergence p99 (ms)          %8.1f  target <= 1000  %s" % (
        summary["convergence_ms_p99"], "met" if summary["convergence_ms_p99"] <= 1000 else "MISSED"))
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "evpn-libvirt.json"), "w") as handle:
        json.dump({"machine": {"kernel": platform.release(), "python": platform.python_version(),
                               "frr": frr_version(), "cpus": os.cpu_count()},
                   "summary": summary, "rows": rows, "seconds": round(time.monotonic() - started, 1)}, handle, indent=2)
    print("wrote bench/results/evpn-libvirt.json (%.0f s)" % (time.monotonic() - started))


if __name__ == "__main__":
    main()
