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
import contextlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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


class Watcher:
    """The instrument: when each port joined BR and was managed (monotonic s), from kernel events.

    A process of its own (no GIL shared with anything) at SCHED_FIFO priority
    1 (if the bench may) reads a raw NETLINK_ROUTE socket and stamps each
    datagram right after its recv, decoding (fdbhook.kernel's decoders) only
    when nothing else waits; ``done`` is set once ``expected`` ports have
    their window, and the stamps come back at ``finish``. Before 2026-12-07
    (runs A-X) a thread of the bench at its nice stamped each event after
    pyroute2 had decoded it, and was itself late by up to 20 ms.
    """

    RTMGRP = 0x1 | 0x4  # RTMGRP_LINK | RTMGRP_NEIGH

    def __init__(self, bridge_index, macs):
        self.bridge_index = bridge_index
        self.macs = set(macs)
        self.joined = {}  # ifindex -> t
        self.flags_off = {}  # ifindex -> t
        self.entry = {}  # ifindex -> t (static entry for a known MAC)
        self.names = {}  # ifindex -> port name
        self.realtime = False

    def start(self):
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self._stop, self.done, ready = context.Event(), context.Event(), context.Event()
        self._pipe, child = context.Pipe(duplex=False)
        self._proc = context.Process(target=self._run, args=(ready, child), daemon=True)
        self._proc.start()
        if not ready.wait(10):
            raise RuntimeError("the watcher process did not start")

    def finish(self):
        """Stop the process; its stamps are this object's."""
        self._stop.set()
        got = self._pipe.recv() if self._pipe.poll(10) else {}
        self._proc.join(10)
        for key, value in got.items():
            setattr(self, key, value)

    def _run(self, ready, pipe):
        import select
        import socket

        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            self.realtime = True
        except (OSError, AttributeError):
            pass
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.bind((0, self.RTMGRP))
        sock.settimeout(0.2)
        sys.path.insert(0, REPO)
        importlib.import_module("fdbhook.kernel")  # now: at the first datagram, the ones behind it would wait

        ready.set()
        stamped = []
        while not self._stop.is_set():
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            stamped.append((time.monotonic(), data))
            if len(stamped) >= 64 or not select.select([sock], [], [], 0)[0]:  # stamp first, decode later
                for now, chunk in stamped:
                    self.note(now, chunk)
                stamped = []
                if len(self.windows_ms()) >= len(self.macs):
                    self.done.set()
        pipe.send({"joined": self.joined, "flags_off": self.flags_off, "entry": self.entry, "names": self.names,
                   "realtime": self.realtime})

    def note(self, now, data):
        """The stamps one datagram (its RTM_NEWLINK and RTM_NEWNEIGH messages) gives, at ``now``."""
        from fdbhook.kernel import _split, entry_from_raw, link_from_raw

        for msg_type, _, msg in _split(data):
            if msg_type == 16:  # RTM_NEWLINK
                link, _ = link_from_raw(msg)
                if link.master == self.bridge_index:
                    self.joined.setdefault(link.ifindex, now)
                    self.names.setdefault(link.ifindex, link.name)
                    if link.learning is False and link.flood is False:
                        self.flags_off.setdefault(link.ifindex, now)
            elif msg_type == 28:  # RTM_NEWNEIGH
                entry = entry_from_raw(msg)
                if entry.mac in self.macs and entry.static:
                    self.entry.setdefault(entry.ifindex, now)

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

    def ports(self):
        """{port name: {joined, flags_off, entry}} in wall-clock seconds (to set beside fdbhookd's log)."""
        wall = time.time() - time.monotonic()
        return {self.names.get(i, str(i)): {"joined": wall + t, "flags_off": wall + self.flags_off[i]
                                            if i in self.flags_off else None,
                                            "entry": wall + self.entry[i] if i in self.entry else None}
                for i, t in self.joined.items()}


def bench_hotplug(cycles=100, per_guest=25, tree=None, mac_base=0, keep_windows=False, boot=False, keep_log=None,
                  state_tmpfs=False):
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
    daemon = watcher = None
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
        watcher.done.wait(20)
        watcher.finish()
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
                if watcher is not None:  # the instrument's stamps, to split a window with the log's times
                    with open(keep_log + ".ports.json", "w") as handle:
                        json.dump(watcher.ports(), handle, indent=1, sort_keys=True)
            os.unlink(log)
    if not windows:
        return {"skipped": "no hotplug completed"}
    p99 = windows[min(len(windows) - 1, int(round(0.99 * (len(windows) - 1))))]
    out = {"cycles": cycles, "managed": len(windows), "p50_ms": round(statistics.median(windows), 1),
           "p99_ms": round(p99, 1), "max_ms": round(windows[-1], 1)}
    out["lockdown"], out["entry"] = _percentiles(lockdowns), _percentiles(entries)
    out["instrument"] = {"realtime": watcher.realtime, "state": "tmpfs" if state_tmpfs else "as installed"}
    if keep_windows:
        out["windows_ms"] = [round(w, 2) for w in windows]
        out["lockdown_ms"] = [round(w, 2) for w in lockdowns]
        out["entry_ms"] = [round(w, 2) for w in entries]
    return out


@contextlib.contextmanager
def state_on_tmpfs(wanted=True):
    """fdbhook's state directory on a tmpfs while the block runs (as on a host whose /run is one), its
    contents carried over and back; a no-op if ``wanted`` is false or it already is a tmpfs."""
    state = state_dir()
    if not wanted or fstype(state) == "tmpfs":
        yield
        return
    os.makedirs(state, mode=0o755, exist_ok=True)
    keep = tempfile.mkdtemp(prefix=PFX + "-state-")
    subprocess.run(["cp", "-a", state + "/.", keep], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", PFX + "-state", state], check=True)
    try:
        subprocess.run(["cp", "-a", keep + "/.", state], check=True)
        yield
    finally:
        shutil.rmtree(keep)
        keep = tempfile.mkdtemp(prefix=PFX + "-state-")
        subprocess.run(["cp", "-a", state + "/.", keep], check=True)
        subprocess.run(["umount", state], check=True)
        for name in os.listdir(state):  # what the run left, nothing else
            path = os.path.join(state, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        subprocess.run(["cp", "-a", keep + "/.", state], check=True)
        shutil.rmtree(keep)


def state_dir():
    """fdbhookd's state directory (fdbhook.config's default)."""
    sys.path.insert(0, REPO)
    from fdbhook.config import DEFAULT_STATE_DIR

    return DEFAULT_STATE_DIR


def fstype(path):
    """The type of the file system ``path`` is on (findmnt), "" if unknown."""
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", path], capture_output=True,
                          text=True).stdout.strip()


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

    base = os.path.dirname(state_dir())  # the file system fdbhookd's state directory lives on
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


def compare(before_ref, cycles, rounds, boots, logs=None, after_tmpfs=False):
    """fdbhookd at ``before_ref`` and the working tree, ``rounds`` times each, interleaved (same load).

    Each round: ``cycles`` hot-plugged NICs (attach), then ``boots`` guests started with one NIC (boot).
    ``logs``: a directory that keeps fdbhookd's log of each run (ROUND-KIND-SIDE.log). ``after_tmpfs``: the
    working tree's runs keep fdbhookd's state on a tmpfs (``--before HEAD``: the file system is all that differs).
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
                        tmpfs = after_tmpfs and label == "after"
                        with state_on_tmpfs(tmpfs):
                            runs[kind, label].append(bench_hotplug(cycles=count, tree=tree, mac_base=base,
                                                                   keep_windows=True, boot=kind == "boot",
                                                                   keep_log=keep, state_tmpfs=tmpfs))
                    base += count
    finally:
        shutil.rmtree(old, ignore_errors=True)
    out = {"rounds": rounds}
    for (kind, label), got in runs.items():
        out.setdefault(kind, {})[label] = dict(_pooled(got), commit=commit if label == "before" else head.strip(),
                                               nice=nices[label], state="tmpfs" if after_tmpfs and label == "after"
                                               else fstype(state_dir()) or "?",
                                               realtime=all(run.get("instrument", {}).get("realtime")
                                                            for run in got))
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
    parser.add_argument("--after-state-tmpfs", action="store_true",
                        help="the working tree's runs keep fdbhookd's state on a tmpfs (with --before HEAD: "
                             "the state's file system is all that differs)")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    result = compare(args.before, args.cycles, args.rounds, args.boots, args.logs, args.after_state_tmpfs)
    result["fsync"] = fsync_cost()
    result["machine"] = {"bench_nice": os.getpriority(os.PRIO_PROCESS, 0), "kernel": os.uname().release,
                         "host": os.uname().nodename, "cpus": os.cpu_count(),
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
            name = "  %s (%s, nice %s, state on %s)" % (label, row.get("commit"), row.get("nice"), row.get("state"))
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
    realtime = all(result[kind][label].get("realtime", True) for kind in ("attach", "boot")
                   for label in ("before", "after") if "skipped" not in result[kind][label])
    print("load average at start %s, at end %s; the watcher %s" % (
        result["machine"]["loadavg_start"], result["machine"]["loadavg_end"],
        "at SCHED_FIFO 1" if realtime else "at nice %d (SCHED_FIFO refused)" % result["machine"]["bench_nice"]))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2, sort_keys=True)
        print("JSON: %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
