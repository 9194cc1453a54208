"""Unicast gap at live migration: fdbhook (with fdbhookd on both hosts) vs an unmanaged bridge.

    sudo python3 bench/migration.py [--migrations N] [--interval S] [--out DIR]

Two hosts on this machine (tests/hostlab.py: libvirtd 9.0 + fdbhookd + the
installed hooks per host, a learning switch between the uplinks) and two
real guests (tests/guestos.py, answering PING with PONG): one on the managed
bridge, one on the unmanaged bridge (learning and flood on, QEMU's announce
frames do the move). Migrations alternate between the two guests, each
going A->B, B->A, ..., so both see the same machine conditions. During each
one a probe on the wire sends a PING every ``interval`` seconds.

Per migration:

* gap: the stretch of PINGs around the resume none of which the guest answered (send
  time of the answered PING after it minus that of the one before) - what a
  sender sees;
* paused: the guest's pause (SUSPENDED on the source to RESUMED on the
  destination, libvirt's event times as virsh prints them);
* gap - paused: what the FDB change-over adds on top of the pause;
* resume->answered: send time of the first PING answered after the gap minus
  the RESUMED event's time (negative: PINGs queued before the resume were
  answered after it);
* stale: PINGs the old host still delivered to a guest port after the resume;
* handover: when the destination's kernel announced the guest's static entry
  minus when the source's announced its removal (``bridge -timestamp monitor
  fdb`` on both hosts, one clock; negative: both hosts held it), and which
  put the destination's entry in: the guest's first frame or RESUMED
  (fdbhookd's log).

A second half does the same with fdbhookd stopped on both hosts
("standalone": the hooks alone; the destination adds the entry at
`started`, while the guest is still paused), unmanaged interleaved again.

Prints a table (p50/p99, nearest rank) and writes JSON to
bench/results/migration-latest.json (and a dated copy).
"""

import argparse
import json
import os
import platform
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from tests import hostlab  # noqa: E402

GUESTS = {  # mode -> (name, MAC, bridge, tap)
    "fdbhook": ("fxd-bm1", "52:54:00:fd:01:01", hostlab.BRIDGE, "fxd-t1"),
    "unmanaged": ("fxd-bm2", "52:54:00:fd:01:02", hostlab.UNMANAGED, "fxd-t2"),
}
TARGET = "fdbhook gap-paused p50/p99 <= unmanaged gap-paused p50/p99"
RESAMPLES = 5000  # bootstrap resamples for the confidence interval of a percentile's difference


def pct(values, p):
    """Nearest-rank percentile (p99 of 12 values is the largest)."""
    values = sorted(values)
    if not values:
        return None
    rank = max(1, -(-len(values) * p // 100))
    return values[int(rank) - 1]


def bootstrap_diff(mine, theirs, p, resamples=RESAMPLES, seed=20):
    """95% interval of pct(mine, p) - pct(theirs, p) over bootstrap resamples of both samples, or None.

    Each resample draws len(values) values with replacement from each sample;
    seeded, so the same rows give the same interval.
    """
    if not mine or not theirs:
        return None
    rnd = random.Random(seed)
    diffs = sorted(pct(rnd.choices(mine, k=len(mine)), p) - pct(rnd.choices(theirs, k=len(theirs)), p)
                   for _ in range(resamples))
    return [round(diffs[int(0.025 * resamples)], 1), round(diffs[int(0.975 * resamples) - 1], 1)]


def machine():
    with open("/proc/cpuinfo") as handle:
        model = next((ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), "?")
    virsh = hostlab.run(["virsh", "--version"], check=False).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d"), "kernel": platform.release(), "cpu": model, "cores": os.cpu_count(),
            "libvirt": virsh}


def one(lab, mode, src, dst, interval):
    name, mac, bridge, _ = GUESTS[mode]
    frames_before = first_frames(dst, name)
    with hostlab.Events(src) as src_events, hostlab.Events(dst) as dst_events, \
            hostlab.Traffic(lab, mac, interval=interval) as traffic, \
            hostlab.FdbMonitor(src, mac, bridge) as src_fdb, hostlab.FdbMonitor(dst, mac, bridge) as dst_fdb:
        time.sleep(0.5)
        t0 = time.monotonic()
        lab.migrate(name, src, dst)
        seconds = time.monotonic() - t0
        time.sleep(0.5)
    obs = hostlab.Observed(name=name, traffic=traffic, src_events=src_events, dst_events=dst_events, seconds=seconds,
                           src=src, dst=dst, result=None, src_fdb=src_fdb, dst_fdb=dst_fdb)
    row = obs.summary()
    row.update(mode=mode, src=src.name, dst=dst.name)
    hand = hostlab.handover(obs)
    if "dst_add_after_src_del_ms" in hand:
        row["handover_ms"] = hand["dst_add_after_src_del_ms"]
        if obs.resumed:
            row["dst_entry_after_resumed_ms"] = round((hand["dst_add"] - obs.resumed) * 1000.0, 1)
    frames = first_frames(dst, name) - frames_before
    if frames or (mode == "fdbhook" and dst.fdbhookd is not None):
        row["entry_by"] = "first frame" if frames else "resumed"
    if "gap_ms" in row and "paused_ms" in row:
        row["over_pause_ms"] = round(row["gap_ms"] - row["paused_ms"], 1)
    return row


def first_frames(host, name):
    """How often HOST's fdbhookd put NAME's entries in at its first frame (its log)."""
    return host.tail("fdbhookd.log", 10 ** 8).count("qemu/%s: first frame of the incoming guest on %s: entries in"
                                                     % (name, GUESTS["fdbhook"][3]))


def fresh(lab, host, mode):
    name, mac, bridge, tap = GUESTS[mode]
    host.virsh("destroy", name, check=False)
    host.create(hostlab.os_guest_xml(name, mac, bridge=bridge, tap=tap))
    control = hostlab.guest_control(host, name)
    control.wait_ready(180)
    control.close()


def stats(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return {"p50": pct(values, 50), "p99": pct(values, 99), "max": max(values) if values else None,
            "n": len(values)}


def run(migrations, interval, standalone, logs=None):
    from tests import guestos

    guestos.image()
    rows = []
    with hostlab.two_hosts() as lab:
        where = {}
        for mode, (name, mac, bridge, tap) in GUESTS.items():
            lab.a.create(hostlab.os_guest_xml(name, mac, bridge=bridge, tap=tap))
            where[mode] = lab.a
        for mode, (name, _, _, _) in GUESTS.items():
            control = hostlab.guest_control(lab.a, name)
            control.wait_ready(120)
            control.close()
        plan = [("fdbhook", "fdbhook"), ("unmanaged", "unmanaged")] * migrations
        if standalone:  # then without fdbhookd: the hooks alone (entry at `started` on the destination)
            plan += [("standalone", "fdbhook"), ("unmanaged", "unmanaged")] * migrations
        for i, (label, mode) in enumerate(plan):
            if label == "standalone" and lab.a.fdbhookd is not None:
                for host in lab.hosts:
                    host.stop_fdbhookd()
            src = where[mode]
            dst = lab.other(src)
            row = one(lab, mode, src, dst, interval)
            row["mode"] = label
            where[mode] = dst
            if row.get("to") != dst.name:
                # the guest stopped answering (TCG guests here sometimes hang in a soft lockup after
                # a migration on a loaded machine): not a figure; boot it again where it is
                row["guest_hung"] = True
                fresh(lab, dst, mode)
            rows.append(row)
            print("  %2d %-10s %s->%s gap %6s ms  paused %6s ms  resume->answered %6s ms  lost %3s  stale %s"
                  "  handover %s ms  entry-resumed %s ms  by %s" % (
                      i // 2 + 1, label, src.name, dst.name, row.get("gap_ms"), row.get("paused_ms"),
                      row.get("resume_to_answered_ms"), row.get("lost"), row.get("stale_after_resume"),
                      row.get("handover_ms"), row.get("dst_entry_after_resumed_ms"), row.get("entry_by")), flush=True)
        if logs:  # the lab's logs go with it
            os.makedirs(logs, exist_ok=True)
            for host in lab.hosts:
                with open(os.path.join(logs, "fdbhookd-%s.log" % host.name), "w") as handle:
                    handle.write(host.tail("fdbhookd.log", 10 ** 9))
    return summarize({"machine": machine(), "interval_ms": interval * 1000, "migrations_per_mode": migrations,
                      "rows": rows}, ("fdbhook", "unmanaged") + (("standalone",) if standalone else ()))


def summarize(result, modes):
    """Add each mode's figures and the target to ``result`` (which has its "rows"); returns it."""
    rows = result["rows"]
    result["modes"], kept = {}, {}
    for mode in modes:
        mine = kept[mode] = [r for r in rows if r["mode"] == mode and not r.get("guest_hung")]
        result.setdefault("guest_hung", {})[mode] = sum(1 for r in rows if r["mode"] == mode and r.get("guest_hung"))
        result["modes"][mode] = {key: stats(mine, key) for key in
                                 ("gap_ms", "paused_ms", "over_pause_ms", "resume_to_answered_ms", "lost",
                                  "stale_after_resume", "migrate_s", "handover_ms", "dst_entry_after_resumed_ms")}
        result["modes"][mode]["handover_min_ms"] = min((r["handover_ms"] for r in mine if "handover_ms" in r),
                                                       default=None)
        result["modes"][mode]["entry_by"] = {by: sum(1 for r in mine if r.get("entry_by") == by)
                                             for by in ("first frame", "resumed")}
    f, u = result["modes"]["fdbhook"]["over_pause_ms"], result["modes"]["unmanaged"]["over_pause_ms"]
    values = {mode: [r["over_pause_ms"] for r in kept[mode] if r.get("over_pause_ms") is not None]
              for mode in ("fdbhook", "unmanaged")}
    result["target"] = {"what": TARGET, "met": f["p50"] is not None and u["p50"] is not None
                        and f["p50"] <= u["p50"] and f["p99"] <= u["p99"],
                        "diff_ci95_ms": {"p%d" % p: bootstrap_diff(values["fdbhook"], values["unmanaged"], p)
                                         for p in (50, 90, 99)}}
    return result


def pool(paths):
    """The rows of several runs' JSON files as one run (each row keeps its run's file name)."""
    rows, machines, intervals = [], [], set()
    for path in paths:
        with open(path) as handle:
            one_run = json.load(handle)
        intervals.add(one_run["interval_ms"])
        machines.append(one_run["machine"])
        rows += [dict(row, run=os.path.basename(path)) for row in one_run["rows"]]
    if len(intervals) != 1:
        raise SystemExit("bench/migration.py: runs with different PING intervals (%s) do not pool"
                         % sorted(intervals))
    modes = [m for m in ("fdbhook", "unmanaged", "standalone") if any(r["mode"] == m for r in rows)]
    per_mode = max(sum(1 for r in rows if r["mode"] == m) for m in modes)
    return summarize({"machine": dict(machines[-1], pooled=[os.path.basename(p) for p in paths]),
                      "interval_ms": intervals.pop(), "migrations_per_mode": per_mode, "rows": rows}, modes)


def print_table(result):
    m = result["machine"]
    print("\nunicast gap at live migration, %s, %s, %d cores, kernel %s, %s" % (
        m["date"], m["cpu"], m["cores"], m["kernel"], m["libvirt"]))
    print("%d migrations per mode (A->B and back alternately), one PING every %.0f ms%s\n" % (
        result["migrations_per_mode"], result["interval_ms"],
        ", pooled: " + " ".join(m["pooled"]) if m.get("pooled") else ""))
    print("%-10s %17s %17s %19s %19s %13s %9s" % ("", "gap ms p50/p99", "paused ms p50/p99", "gap-paused p50/p99",
                                                  "resume->answered", "lost p50/p99", "stale max"))
    for mode, s in result["modes"].items():
        print("%-10s %17s %17s %19s %19s %13s %9s" % (
            mode, "%s / %s" % (s["gap_ms"]["p50"], s["gap_ms"]["p99"]),
            "%s / %s" % (s["paused_ms"]["p50"], s["paused_ms"]["p99"]),
            "%s / %s" % (s["over_pause_ms"]["p50"], s["over_pause_ms"]["p99"]),
            "%s / %s" % (s["resume_to_answered_ms"]["p50"], s["resume_to_answered_ms"]["p99"]),
            "%s / %s" % (s["lost"]["p50"], s["lost"]["p99"]), s["stale_after_resume"]["max"]))
    print("\n%-10s %21s %13s %27s %s" % ("", "handover ms p50/p99", "min", "entry-RESUMED ms p50/p99",
                                         "entry put in by"))
    for mode, s in result["modes"].items():
        if s["handover_ms"]["n"]:
            print("%-10s %21s %13s %27s %s" % (
                mode, "%s / %s" % (s["handover_ms"]["p50"], s["handover_ms"]["p99"]), s["handover_min_ms"],
                "%s / %s" % (s["dst_entry_after_resumed_ms"]["p50"], s["dst_entry_after_resumed_ms"]["p99"]),
                ", ".join("%s %d" % kv for kv in s["entry_by"].items())))
    print("handover: destination entry announced minus source entry removed (negative: both hosts held it)")
    print("\nmigrations after which the guest stopped answering (left out, guest booted again): %s"
          % ", ".join("%s %d" % kv for kv in result["guest_hung"].items()))
    print("target: %s: %s" % (result["target"]["what"], "met" if result["target"]["met"] else "MISSED"))
    print("fdbhook minus unmanaged, gap-paused, 95%% bootstrap interval (%d resamples): %s" % (
        RESAMPLES, ", ".join("%s [%s, %s] ms" % (p, ci[0], ci[1]) for p, ci in result["target"]["diff_ci95_ms"].items()
                             if ci is not None)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--migrations", type=int, default=12, help="per mode (default 12)")
    parser.add_argument("--interval", type=float, default=0.005,
                        help="seconds between PINGs (default 0.005; a TCG guest answering more often drops frames)")
    parser.add_argument("--no-standalone", action="store_true",
                        help="skip the second half (the managed guest migrated without fdbhookd on either host)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--logs", metavar="DIR", help="keep each host's fdbhookd log there")
    parser.add_argument("--pool", nargs="+", metavar="JSON",
                        help="no migrations: pool the rows of these runs' JSON files and print their table")
    args = parser.parse_args()
    if args.pool:
        result = pool(args.pool)
        print_table(result)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "migration-pooled-latest.json"), "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
        print("JSON: %s" % os.path.join(args.out, "migration-pooled-latest.json"))
        return 0
    if os.geteuid() != 0:
        print("bench/migration.py: needs root (namespaces, libvirtd)", file=sys.stderr)
        return 2
    result = run(args.migrations, args.interval, not args.no_standalone, args.logs)
    print_table(result)
    os.makedirs(args.out, exist_ok=True)
    for name in ("migration-latest.json", "migration-%s.json" % time.strftime("%Y%m%d-%H%M%S")):
        with open(os.path.join(args.out, name), "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
    print("JSON: %s" % os.path.join(args.out, "migration-latest.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
