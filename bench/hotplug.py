"""Hotplug window: from a hot-plugged NIC's port joining the bridge to the
port being managed (learning off, flood off, static entry present).

Needs libvirtd with fdbhook's hooks (sudo ./tests/run or ./install.sh sets
that up) and starts fdbhookd from /opt/fdbhook itself, or with ``tree`` from
a source tree (PYTHONPATH) with /opt/fdbhook's interpreter. Uses a bridge and
guests of its own (prefix fdbbench-); the admin's /etc/fdbhook/fdbhook.conf
is saved and put back.

Run alone (``python3 bench/hotplug.py``) it compares, in the same run and
interleaved, fdbhookd from a git ref (``--before``, the old path) with the
working tree's, prints a table and writes JSON. Per port it reports the join
-> learning/flood off ("lock-down window": fdbhookd locks an unknown guest
port down at its join) and the join -> static entry (which needs the NIC's
MAC from libvirt), and the cost of the lock-down's one durable write.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

PFX = os.environ.get("FDBHOOK_BENCH_PREFIX", "fdbbench")
BR = PFX + "-br0"
URI = "qemu:///system"
CONF = "/etc/fdbhook/fdbhook.conf"
FDBHOOK = "/opt/fdbhook/bin/fdbhook"
PYTHON = "/opt/fdbhook/bin/python3"
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def virsh(*args, check=True):
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError("virsh %s: %s" % (" ".join(args), proc.stderr.strip()))
    return proc


def available():
    if shutil.which("virsh") is None or not os.path.exists(FDBHOOK):
        return "virsh or /opt/fdbhook missing (run sudo ./tests/run or ./install.sh first)"
    if virsh("uri", check=False).returncode != 0:
        return "libvirtd does not answer on %s (tests/system/libvirtd-up.sh starts it)" % URI
    return None


class Watcher(threading.Thread):
    """Kernel events, timestamped on arrival: when each port joined BR and was managed."""

    def __init__(self, bridge_index, macs):
        super().__init__(daemon=True)
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.ipr.bind(groups=0x1 | 0x4)  # RTMGRP_LINK | RTMGRP_NEIGH
        self.bridge_index = bridge_index
        self.macs = set(macs)
        self.joined = {}  # ifindex -> t
        self.flags_off = {}  # ifindex -> t
        self.entry = {}  # ifindex -> t (static entry for a known MAC)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for msg in self.ipr.get():
                now = time.monotonic()
                event = msg.get("event")
                if event == "RTM_NEWLINK" and msg.get_attr("IFLA_MASTER") == self.bridge_index:
                    idx = msg["index"]
                    self.joined.setdefault(idx, now)
                    info = msg.get_attr("IFLA_LINKINFO")
                    data = info.get_attr("IFLA_INFO_SLAVE_DATA") if info is not None else None
                    if data is not None and data.get_attr("IFLA_BRPORT_LEARNING") == 0 \
                            and data.get_attr("IFLA_BRPORT_UNICAST_FLOOD") == 0:
                        self.flags_off.setdefault(idx, now)
                elif event == "RTM_NEWNEIGH" and msg.get_attr("NDA_LLADDR") in self.macs \
                        and msg["state"] & 0x40:
                    self.entry.setdefault(msg["ifindex"], now)

    def windows_ms(self):
        out = []
        for idx, joined in self.joined.items():
            if idx in self.flags_off and idx in self.entry:
                out.append((max(self.flags_off[idx], self.entry[idx]) - joined) * 1000)
        return out

    def lockdown_ms(self):
        """Per port: join -> learning and flood off (the lock-down, or the whole apply on the old path)."""
        return [(self.flags_off[idx] - joined) * 1000 for idx, joined in self.joined.items() if idx in self.flags_off]

    def entry_ms(self):
        """Per port: join -> the static entry for the NIC's MAC."""
        return [(self.entry[idx] - joined) * 1000 for idx, joined in self.joined.items() if idx in self.entry]


def bench_hotplug(cycles=100, per_guest=25, tree=None, mac_base=0, keep_windows=False, boot=False, keep_log=None):
    """Hot-plug ``cycles`` NICs into guests of their own; window percentiles. ``tree``: run fdbhookd from it.

    ``boot``: start ``cycles`` guests with one NIC each instead (the window from the tap joining the
    bridge, during the start, to the port being managed). ``keep_log``: fdbhookd's log is copied there.
    """
    reason = available()
    if reason:
        return {"skipped": reason}
    saved = open(CONF).read() if os.path.exists(CONF) else None
    log = tempfile.mktemp(prefix="fdbbench-hotplug-", suffix=".log")
    guests = [] if boot else ["%s-hp%d" % (PFX, i) for i in range((cycles + per_guest - 1) // per_guest)]
    daemon = None
    try:
        os.makedirs(os.path.dirname(CONF), exist_ok=True)
        with open(CONF, "w") as handle:
            handle.write("[manage]\nbridges = %s\n" % BR)
        subprocess.run(["ip", "link", "add", BR, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", BR, "up"], check=True)
        bridge_index = int(open("/sys/class/net/%s/ifindex" % BR).read())
        env = dict(os.environ, FDBHOOK_LOG=log)
        argv = [FDBHOOK, "daemon"]
        if tree is not None:
            env["PYTHONPATH"] = tree
            argv = [PYTHON, "-m", "fdbhook", "daemon"]
        nice = unit_nice(tree or REPO)  # as systemd starts it (the unit's Nice=), whatever the bench's own
        daemon = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, nice))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "qemu:///system: connected" not in _read(log):
            time.sleep(0.1)
        for name in guests:
            with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
                handle.write(_domain_xml(name))
                handle.flush()
                virsh("create", handle.name)
        macs = ["52:54:00:b0:%02x:%02x" % ((mac_base + i) // 256, (mac_base + i) % 256) for i in range(cycles)]
        watcher = Watcher(bridge_index, macs)
        watcher.start()
        for i, mac in enumerate(macs):
            nic = ("<interface type='bridge'><mac address='%s'/><source bridge='%s'/>"
                   "<model type='virtio'/><rom enabled='no'/></interface>" % (mac, BR))
            if boot:
                guests.append("%s-b%d" % (PFX, i))
                nic = _domain_xml(guests[-1], nic)
            with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
                handle.write(nic)
                handle.flush()
                if boot:
                    virsh("create", handle.name)
                else:
                    virsh("attach-device", guests[i // per_guest], handle.name, "--live")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(watcher.windows_ms()) < cycles:
            time.sleep(0.1)
        watcher.stop.set()
        windows = sorted(watcher.windows_ms())
        lockdowns, entries = sorted(watcher.lockdown_ms()), sorted(watcher.entry_ms())
    finally:
        for name in guests:
            virsh("destroy", name, check=False)
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=20)
        subprocess.run(["ip", "link", "del", BR], stderr=subprocess.DEVNULL)
        if saved is None:
            os.unlink(CONF)
        else:
            with open(CONF, "w") as handle:
                handle.write(saved)
        if os.path.exists(log):
            if keep_log:
                shutil.copyfile(log, keep_log)
            os.unlink(log)
    if not windows:
        return {"skipped": "no hotplug completed"}
    p99 = windows[min(len(windows) - 1, int(round(0.99 * (len(windows) - 1))))]
    out = {"cycles": cycles, "managed": len(windows), "p50_ms": round(statistics.median(windows), 1),
           "p99_ms": round(p99, 1), "max_ms": round(windows[-1], 1)}
    out["lockdown"], out["entry"] = _percentiles(lockdowns), _percentiles(entries)
    if keep_windows:
        out["windows_ms"] = [round(w, 2) for w in windows]
        out["lockdown_ms"] = [round(w, 2) for w in lockdowns]
        out["entry_ms"] = [round(w, 2) for w in entries]
    return out


def _percentiles(values):
    values = sorted(values)
    if not values:
        return {"n": 0}
    p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
    return {"n": len(values), "p50_ms": round(statistics.median(values), 1), "p99_ms": round(p99, 1),
            "max_ms": round(values[-1], 1)}


def _domain_xml(name, devices=""):
    return ("<domain type='qemu'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
            "<devices>%s</devices></domain>" % (name, devices))


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def unit_nice(tree):
    sys.path.insert(0, REPO)
    from tests.helpers import unit_nice as nice

    return nice(tree)


def _export(ref, into):
    """The fdbhook package and unit as of git ``ref`` (the old path), unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", REPO, "archive", ref, "fdbhook", "fdbhookd.service"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", ref], capture_output=True, text=True,
                          check=True).stdout.strip()


def _pooled(runs):
    windows = sorted(w for run in runs for w in run.get("windows_ms", ()))
    if not windows:
        return {"skipped": "; ".join(run.get("skipped", "") for run in runs)}
    p99 = windows[min(len(windows) - 1, int(round(0.99 * (len(windows) - 1))))]
    return {"cycles": sum(run.get("cycles", 0) for run in runs), "managed": len(windows),
            "p50_ms": round(statistics.median(windows), 1), "p99_ms": round(p99, 1), "max_ms": round(windows[-1], 1),
            "lockdown": _percentiles(w for run in runs for w in run.get("lockdown_ms", ())),
            "entry": _percentiles(w for run in runs for w in run.get("entry_ms", ()))}


def fsync_cost(writes=50):
    """The lock-down's one durable write (temp file, fsync, rename, directory fsync) where the state lives."""
    sys.path.insert(0, REPO)
    from fdbhook import safefile

    from fdbhook.config import DEFAULT_STATE_DIR

    base = os.path.dirname(DEFAULT_STATE_DIR)  # the file system fdbhookd's state directory lives on
    directory = tempfile.mkdtemp(prefix=PFX + "-fsync-", dir=base)
    times = []
    try:
        for i in range(writes):
            started = time.monotonic()
            safefile.write_file(os.path.join(directory, "%d.json" % i), b'{"format": 1, "port": "vnet0"}' * 4,
                                mode=0o600, dir_mode=0o700)
            times.append((time.monotonic() - started) * 1000)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return dict(_percentiles(times), where=base)


def compare(before_ref, cycles, rounds, boots, logs=None):
    """fdbhookd at ``before_ref`` and the working tree, ``rounds`` times each, interleaved (same load).

    Each round: ``cycles`` hot-plugged NICs (attach), then ``boots`` guests started with one NIC (boot).
    ``logs``: a directory that keeps fdbhookd's log of each run (ROUND-KIND-SIDE.log).
    """
    old = tempfile.mkdtemp(prefix=PFX + "-old-")
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    try:
        commit = _export(before_ref, old)
        nices = {"before": unit_nice(old), "after": unit_nice(REPO)}  # read while the old tree is there
        runs = {(kind, label): [] for kind in ("attach", "boot") for label in ("before", "after")}
        base = 0
        for n in range(rounds):
            for kind, count in (("attach", cycles), ("boot", boots)):
                for label, tree in (("before", old), ("after", REPO)):
                    if count:
                        keep = os.path.join(logs, "%d-%s-%s.log" % (n, kind, label)) if logs else None
                        runs[kind, label].append(bench_hotplug(cycles=count, tree=tree, mac_base=base,
                                                               keep_windows=True, boot=kind == "boot",
                                                               keep_log=keep))
                    base += count
    finally:
        shutil.rmtree(old, ignore_errors=True)
    out = {"rounds": rounds}
    for (kind, label), got in runs.items():
        out.setdefault(kind, {})[label] = dict(_pooled(got), commit=commit if label == "before" else head.strip(),
                                               nice=nices[label])
    out["before_ref"] = before_ref
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="main", help="git ref of the old path (default: main)")
    parser.add_argument("--cycles", type=int, default=50, help="hot-plugged NICs per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--boots", type=int, default=10, help="guests started with one NIC per round and side")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--logs", help="keep fdbhookd's log of each run in this directory")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    result = compare(args.before, args.cycles, args.rounds, args.boots, args.logs)
    result["fsync"] = fsync_cost()
    result["machine"] = {"bench_nice": os.getpriority(os.PRIO_PROCESS, 0), "kernel": os.uname().release, "host": os.uname().nodename, "cpus": os.cpu_count(),
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                         "load": round(os.getloadavg()[0], 2), "loadavg_start": load_before,
                         "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    print("window: port joins the bridge -> learning/flood off + entry; %d rounds, before/after interleaved; "
          "load %.2f" % (args.rounds, result["machine"]["load"]))
    print("%-30s %8s %8s %8s %8s %9s" % ("", "cycles", "managed", "p50 ms", "p99 ms", "max ms"))
    for kind, title in (("attach", "hot-plugged NIC (attach-device)"), ("boot", "guest start, 1 NIC")):
        print(title)
        for label in ("before", "after"):
            row = result[kind][label]
            name = "  %s (%s, nice %s)" % (label, row.get("commit"), row.get("nice"))
            if "skipped" in row:
                print("%-30s skipped: %s" % (name, row["skipped"]))
            else:
                print("%-30s %8d %8d %8.1f %8.1f %9.1f" % (name, row["cycles"], row["managed"], row["p50_ms"],
                                                        row["p99_ms"], row["max_ms"]))
        for part, words in (("lockdown", "join -> learning/flood off"), ("entry", "join -> static entry")):
            print("  %s" % words)
            for label in ("before", "after"):
                row = result[kind][label].get(part) or {"n": 0}
                if row["n"]:
                    print("%-30s %8s %8d %8.1f %8.1f %9.1f" % ("    " + label, "", row["n"], row["p50_ms"],
                                                            row["p99_ms"], row["max_ms"]))
        after = result[kind]["after"]
        if "p99_ms" in after:
            print("  target p99 <= 20 ms, join -> learning/flood off + entry: %s" % (
                "met" if after["p99_ms"] <= 20.0 else "MISSED"))
            lock = after.get("lockdown") or {}
            if lock.get("n"):
                print("  target p99 <= 20 ms, join -> learning/flood off (lock-down): %s" % (
                    "met" if lock["p99_ms"] <= 20.0 else "MISSED"))
    fs = result["fsync"]
    print("durable write (pending record) in %s: p50 %.1f ms, p99 %.1f ms, max %.1f ms (%d writes)" % (
        fs["where"], fs["p50_ms"], fs["p99_ms"], fs["max_ms"], fs["n"]))
    print("load average at start %s, at end %s; the bench's own watcher at nice %d" % (
        result["machine"]["loadavg_start"], result["machine"]["loadavg_end"], result["machine"]["bench_nice"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
        print("JSON: %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
