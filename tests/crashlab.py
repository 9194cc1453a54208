"""Crash and fault injection at every step of every lifecycle operation, on real bridges and taps.

Run inside a network namespace the caller created (tests/kernel/test_crash_kernel.py, bench/crash.py):

    python -m tests.crashlab --nics 1,4 [--faults EINVAL,EBUSY,ENOBUFS] [--fault-nics 1] [--json OUT]
                             [--bridge-vlan]

For each operation (start, started, stopped, release, reconnect, hotplug
attach and detach, a guest MAC change, fdbhookd's suspend and resume of a
guest and its drift repair, resync) and each kind of step (the k-th kernel
write request, the k-th durable state-file change), for k = 1, 2, ... until
the operation completes without reaching k: reset the ports to their original
state, bring the domain to the state before the operation, run the operation
in a forked child with FDBHOOK_CRASH_AT=kind:k (the child SIGKILLs itself
there), then run the next lifecycle event (which recovers) and check the
invariant. Fault rows do the same with FDBHOOK_FAULT_AT=kernel:k:ERRNO and
also check the exit code and the one-line error.

The hooks run the real entry (fdbhook.cli.hook_main: stdin XML, exit code,
stderr) and the daemon's operations run what fdbhookd's worker runs
(engine.reconcile; engine.reapply_record with paused for SUSPENDED/RESUMED;
engine.resync); each in a child forked from this process after the imports
(one Python start for hundreds of runs).

``--bridge-vlan``: the bridge starts with vlan_filtering off and the config
turns it on (a first start must switch it, the last guest's stop must put it
back); the invariant then covers the bridge too. Only a kernel with
CONFIG_BRIDGE_VLAN_FILTERING switches (bench/crash.py --fullkernel and the
full-kernel tier run it there); elsewhere it exercises the "cannot" path.

Invariant: every port is either managed exactly as planned (learning and
flood off, the static entries of its record, the record's "before" flags
equal to the port's original ones; a paused record: no entries) or exactly
in its original state; no record without its port, no changed port without
a record, no intent left. Bridge (--bridge-vlan): vlan_filtering on only
with a settled record whose state-before is "off" and a guest on it;
off with no record of a switch.
"""

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BRIDGE = "br0"
MAX_POINTS = 400  # an operation of 16 NICs needs about 50
OPS = ("start", "started", "stopped", "release", "reconnect", "attach", "detach", "macchange",
       "suspend", "resume", "resync")
# fdbhookd's lock-down of a guest port at its join (fdbhook.lockdown), on the last port (a tap addressed
# like libvirt's): the lock-down itself (then claimed by the hot-plug apply, or put back at its bound),
# the claim (the apply of its NIC), the put-back at the bound; claim-other: the NIC's MAC is not the one
# the tap predicted (02:54:00:.. for a tap fe:54:00:..), so the claim takes the predicted entry out.
LOCKDOWN_OPS = ("lockdown", "lockdown-undo", "claim", "claim-other", "expire")
CLAIMS = ("claim", "claim-other")
# fdbhookd on a live migration's destination: the paused record's resume planned and its intent written
# ahead (engine.arm_record), then fired at the guest's first frame (engine.fire_armed); one child does both.
ARMED_OPS = ("firstframe",)
BRIDGE_OPS = ("start", "stopped")  # --bridge-vlan: the first start switches the bridge, the last stop undoes it
HOOK_OPS = ("start", "started", "stopped", "release", "reconnect")
APPLY_HOOKS = ("start", "started", "reconnect")
# The next lifecycle event after each operation (a new run: it recovers first). A killed
# resync is followed by fdbhookd's next one (its restart resyncs at once).
NEXT = {"start": "started", "started": "reconnect", "stopped": "release", "release": "start",
        "reconnect": "stopped", "attach": "sync", "detach": "sync-detached", "macchange": "sync-mac",
        "suspend": "resume", "resume": "resync", "resync": "resync",
        "lockdown": "attach", "lockdown-undo": "expire", "claim": "sync", "claim-other": "sync-other",
        "expire": "expire",
        "firstframe": "resync"}


def sh(*argv, check=True):
    res = subprocess.run(argv, capture_output=True, text=True)
    if check and res.returncode:
        raise RuntimeError("%s: %s" % (" ".join(argv), res.stderr.strip()))
    return res.stdout


class Bench:
    """One bridge, ``nics`` persistent taps (odd ones with flood off originally), one domain."""

    def __init__(self, nics, workdir, tag="c", bridge_vlan=False):
        self.nics = nics
        self.bridge_vlan = bridge_vlan
        self.ports = ["%s%dp%d" % (tag, nics, i) for i in range(nics)]
        self.macs = ["52:54:00:c%x:%02x:%02x" % (nics % 16, nics, i) for i in range(nics)]
        self.new_mac = "52:54:00:cc:%02x:ff" % nics
        self.other_mac = "02" + self.macs[-1][2:]  # the last NIC's MAC in claim-other (not the predicted one)
        self.name = "crash%d" % nics
        self.original = {p: {"learning": True, "flood": i % 2 == 0, "locked": False}
                         for i, p in enumerate(self.ports)}
        self.workdir = workdir
        self.state = os.path.join(workdir, "state%d" % nics)
        if not os.path.exists("/sys/class/net/%s" % BRIDGE):
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "link", "set", BRIDGE, "up")
        # Can this kernel switch the bridge at all (CONFIG_BRIDGE_VLAN_FILTERING)?
        sh("ip", "link", "set", BRIDGE, "type", "bridge", "vlan_filtering", "1", check=False)
        self.can_filter = self.filtering()
        sh("ip", "link", "set", BRIDGE, "type", "bridge", "vlan_filtering", "0", check=False)
        for i, port in enumerate(self.ports):
            sh("ip", "tuntap", "add", port, "mode", "tap")
            if i == nics - 1:  # addressed as libvirt addresses a NIC's tap: the lock-down's port
                sh("ip", "link", "set", port, "address", "fe" + self.macs[i][2:])
            sh("ip", "link", "set", port, "master", BRIDGE)

    # --- XML ----------------------------------------------------------------------------
    def xml(self, nics=None, mac0=None, last_mac=None):
        items = []
        for i in range(self.nics if nics is None else nics):
            mac = last_mac if last_mac and i == self.nics - 1 else self.macs[i]
            mac_el = "<mac address='%s'%s/>" % (mac, " currentAddress='%s'" % mac0 if i == 0 and mac0 else "")
            items.append("<interface type='bridge'>%s<source bridge='%s'/><target dev='%s'/><alias name='net%d'/>"
                         "</interface>" % (mac_el, BRIDGE, self.ports[i], i))
        return ("<domain type='kvm'><name>%s</name><uuid>00000000-0000-0000-0000-%012d</uuid><devices>%s"
                "</devices></domain>" % (self.name, self.nics, "".join(items))).encode()

    # --- state ---------------------------------------------------------------------------
    def filtering(self):
        link = json.loads(sh("ip", "-d", "-j", "link", "show", "dev", BRIDGE))[0]
        return bool(link.get("linkinfo", {}).get("info_data", {}).get("vlan_filtering"))

    def reset(self):
        """Every port back to its original state, no records, no intents (by iproute2, not fdbhook)."""
        shutil.rmtree(self.state, ignore_errors=True)
        if self.can_filter:
            sh("ip", "link", "set", BRIDGE, "type", "bridge", "vlan_filtering", "0")
        lines = []
        for port in self.ports:
            orig = self.original[port]
            lines.append("link set dev %s learning %s flood %s locked off" % (
                port, "on" if orig["learning"] else "off", "on" if orig["flood"] else "off"))
        for entry in self.statics():
            lines.append("fdb del %s dev %s master" % (entry["mac"], entry["ifname"]))
        batch = os.path.join(self.workdir, "reset.batch")
        with open(batch, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        sh("bridge", "-force", "-batch", batch, check=False)

    def statics(self):
        return [e for e in json.loads(sh("bridge", "-j", "fdb", "show", "br", BRIDGE) or "[]")
                if e.get("state") == "static" and e.get("ifname") in self.ports]

    def port_states(self):
        """{port: (learning, flood, locked, frozenset(static MACs on it))}."""
        links = {l["ifname"]: l for l in json.loads(sh("bridge", "-j", "-d", "link", "show") or "[]")}
        statics = {}
        for entry in self.statics():
            statics.setdefault(entry["ifname"], set()).add(entry["mac"])
        out = {}
        for port in self.ports:
            link = links.get(port, {})
            out[port] = (bool(link.get("learning")), bool(link.get("flood")), bool(link.get("locked")),
                         frozenset(statics.get(port, ())))
        return out

    def records(self):
        directory = os.path.join(self.state, "domains")
        out = []
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(directory, name)) as handle:
                    out.append(json.load(handle))
        return out

    def bridge_record(self):
        path = os.path.join(self.state, "bridges", "%s.json" % BRIDGE)
        if not os.path.exists(path):
            return None
        with open(path) as handle:
            return json.load(handle)

    def bridge_violations(self, records):
        """The bridge half of the invariant (--bridge-vlan)."""
        rec = self.bridge_record() or {}
        used = any(nic["bridge"] == BRIDGE for record in records for nic in record["nics"])
        if rec.get("pending"):
            return ["bridge record left pending: %s" % rec]
        if self.filtering():
            if rec.get("prev_vlan_filtering") is not False or not used:
                return ["bridge %s switched on: record %s, a guest on it: %s" % (BRIDGE, rec or None, used)]
        elif "prev_vlan_filtering" in rec:
            return ["bridge %s back off but its record says we switched it: %s" % (BRIDGE, rec)]
        elif used and self.can_filter:
            return ["a guest is managed on %s but vlan_filtering is off" % BRIDGE]
        return []

    def violations(self):
        """What breaks the invariant now (empty: holds)."""
        bad = []
        states = self.port_states()
        recorded, paused = {}, {}
        records = self.records()
        if self.bridge_vlan:
            bad.extend(self.bridge_violations(records))
        for record in records:
            for nic in record["nics"]:
                paused[nic["port"]] = bool(record.get("paused"))
                if nic["port"] not in states:
                    bad.append("record for %s without its port" % nic["port"])
                recorded[nic["port"]] = nic
        intents = os.path.join(self.state, "intents")
        if os.path.isdir(intents) and [n for n in os.listdir(intents) if n.endswith(".json")]:
            bad.append("intent left: %s" % os.listdir(intents))
        pending = os.path.join(self.state, "pending")
        if os.path.isdir(pending) and [n for n in os.listdir(pending) if n.endswith(".json")]:
            bad.append("pending lock-down left: %s" % os.listdir(pending))
        for port, (learning, flood, locked, macs) in states.items():
            orig = self.original[port]
            nic = recorded.get(port)
            if nic is None:
                if (learning, flood, locked, macs) != (orig["learning"], orig["flood"], orig["locked"], frozenset()):
                    bad.append("%s changed without a record: learning %s flood %s locked %s statics %s"
                               % (port, learning, flood, locked, sorted(macs)))
                continue
            want_macs = frozenset([nic["mac"]] + list(nic.get("extra_macs") or ()))
            if paused.get(port):
                want_macs = frozenset()
            if (learning, flood, locked, macs) != (False, False, False, want_macs):
                bad.append("%s recorded but not as planned: learning %s flood %s statics %s (want %s)"
                           % (port, learning, flood, sorted(macs), sorted(want_macs)))
            if (nic["prev_learning"], nic["prev_flood"]) != (orig["learning"], orig["flood"]):
                bad.append("%s: the record's state-before (learning %s flood %s) is not the original"
                           % (port, nic["prev_learning"], nic["prev_flood"]))
        return bad


# --- running one step in a forked child --------------------------------------------------

def _child(bench, step, env):
    """Run ``step`` here (a forked child): returns the exit code to report."""
    from fdbhook import faults

    os.environ.update(env)
    faults.load()
    if step in HOOK_OPS or step in ("start-partial",):
        from fdbhook.cli import hook_main

        xml = bench.xml(bench.nics - 1 if step == "start-partial" else None)
        op = "start" if step == "start-partial" else step
        return hook_main("qemu", [bench.name, op, "begin", "-"], stdin=io.BytesIO(xml))
    from fdbhook.config import load_config
    from fdbhook.daemon import with_guest_mac
    from fdbhook.domxml import parse_domain
    from fdbhook.engine import reapply_record, reconcile, resync
    from fdbhook.kernel import Kernel
    from fdbhook.logsetup import setup_logging
    from fdbhook.state import Store

    setup_logging(verbose=False, hook=True)
    config = load_config()
    store = Store(config.state_dir)
    if step in LOCKDOWN_OPS and step not in CLAIMS:
        return _lockdown_child(bench, step, config, store)
    alias = None
    if step in ("detach", "sync-detached"):
        domain = parse_domain(bench.xml(bench.nics - 1), driver="qemu")
    elif step in ("claim-other", "sync-other"):
        domain = parse_domain(bench.xml(last_mac=bench.other_mac), driver="qemu")
    else:
        domain = parse_domain(bench.xml(), driver="qemu")
    if step in ("macchange", "sync-mac"):
        domain = with_guest_mac(domain, "net0", bench.new_mac)
    if step in ("attach",) + CLAIMS:
        alias = "net%d" % (bench.nics - 1)
    elif step == "macchange":
        alias = "net0"
    with Kernel() as kernel:
        if step == "firstframe":
            from fdbhook.engine import arm_record, fire_armed

            armed = arm_record("qemu", bench.name, kernel, store)
            return 3 if armed is None or fire_armed(armed, kernel) is None else 0
        if step in ("suspend", "resume"):
            reapply_record("qemu", bench.name, kernel, store, config, paused=step == "suspend")
        elif step == "resync":
            resync(kernel, store, config)
        else:
            reconcile(domain, False, config, kernel, store, alias=alias)
    return 0


def _lockdown_child(bench, step, config, store):
    """fdbhookd's lock-down of the last port (as its link monitor does it), or the put-back at the bound."""
    from fdbhook import lockdown
    from fdbhook.kernel import Kernel

    port = bench.ports[-1]
    with Kernel() as kernel:
        if step == "expire":
            with store.lock():
                lockdown.settle(kernel, store, everything=True)
            return 0
        link, bridge = kernel.by_name(port), kernel.by_name(BRIDGE)
        decision = lockdown.lock_down(kernel, store, config, link, BRIDGE, bridge.ifindex,
                                      target_devs=frozenset([port]))
        return 0 if decision.lock or "kernel refused" in decision.why else 3


def run_step(bench, step, env=None):
    """(exit code or -signal, stderr text, kernel requests counted, files counted) of one step."""
    errfile = tempfile.TemporaryFile()
    countfile = os.path.join(bench.workdir, "counts")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.dup2(errfile.fileno(), 2)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            code = _child(bench, step, dict(env or {}))
            from fdbhook import faults
            with open(countfile, "w") as handle:
                json.dump(faults.counts(), handle)
        except BaseException as exc:
            os.write(2, ("crashlab child: %r\n" % (exc,)).encode())
        finally:
            os._exit(code if isinstance(code, int) else 70)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    errfile.seek(0)
    err = errfile.read().decode(errors="replace")
    errfile.close()
    counts = {"kernel": 0, "file": 0}
    if code >= 0 and os.path.exists(countfile):
        with open(countfile) as handle:
            counts = json.load(handle)
        os.unlink(countfile)
    return code, err, counts


def prepare(bench, op):
    """Reset, then bring the domain to where ``op`` starts from."""
    bench.reset()
    if op == "start":
        return
    if op in LOCKDOWN_OPS:
        prepare(bench, "attach")
        if op in CLAIMS + ("expire",):
            _ok(bench, "lockdown")
        return
    if op == "attach":
        if bench.nics > 1:
            _ok(bench, "start-partial")
        return
    _ok(bench, "start")
    if op in ("resume", "firstframe"):
        _ok(bench, "suspend")
    if op in ("reconnect", "resync"):  # drift to heal: a port learning again, an entry gone
        sh("bridge", "link", "set", "dev", bench.ports[0], "learning", "on")
        sh("bridge", "fdb", "del", bench.macs[-1], "dev", bench.ports[-1], "master", check=False)


def _ok(bench, step):
    code, err, _ = run_step(bench, step)
    if code != 0:
        raise RuntimeError("set-up step %s failed (%s): %s" % (step, code, err.strip()))


def run_cases(bench, ops, kinds, errnos, deadline=None):
    """Every crash point of ``ops`` (and fault rows for ``errnos``): a list of row dicts."""
    rows = []
    for op in ops:
        for kind in kinds:
            rows.append(_sweep(bench, op, "crash", kind, None))
        for name in errnos:
            rows.append(_sweep(bench, op, "fault", "kernel", name))
        if deadline is not None and time.monotonic() > deadline:
            break
    return rows


def _sweep(bench, op, mode, kind, errname):
    # "dirty": cases where the invariant did not hold right after the kill, before the next event
    # recovered (the harness sees the damage recovery repairs).
    row = {"nics": bench.nics, "op": op, "mode": mode, "kind": kind, "errno": errname, "points": 0,
           "violations": [], "exit_codes": {}, "dirty": 0}
    k = 0
    while True:
        k += 1
        if k > MAX_POINTS:
            row["violations"].append("still not done after %d points" % MAX_POINTS)
            break
        prepare(bench, op)
        if mode == "crash":
            env = {"FDBHOOK_CRASH_AT": "%s:%d" % (kind, k)}
        else:
            env = {"FDBHOOK_FAULT_AT": "kernel:%d:%s" % (k, errname)}
        code, err, counts = run_step(bench, op, env)
        if mode == "crash" and code != -signal.SIGKILL:
            _check_completed(row, k, code, err)
            break
        if mode == "fault" and counts.get("kernel", 0) < k:
            _check_completed(row, k, code, err)
            break
        row["points"] += 1
        row["exit_codes"][str(code)] = row["exit_codes"].get(str(code), 0) + 1
        if mode == "fault":
            _check_fault_answer(row, op, k, code, err)
        row["dirty"] += bool(bench.violations())
        nxt_code, nxt_err, _ = run_step(bench, NEXT[op])
        if nxt_code != 0 and NEXT[op] not in ("stopped", "release"):
            # a next apply may fail for a reason of its own; the invariant still decides
            row["violations"].append("k=%d: next event %s exited %s: %s" % (k, NEXT[op], nxt_code, nxt_err.strip()))
        for problem in bench.violations():
            row["violations"].append("k=%d: %s" % (k, problem))
    return row


def _check_completed(row, k, code, err):
    """The run that did not reach k: the operation's plain result."""
    if code != 0:
        row["violations"].append("k=%d: the undisturbed run exited %s: %s" % (k, code, err.strip()))


def _check_fault_answer(row, op, k, code, err):
    lines = [line for line in err.splitlines() if line.strip()]
    if op in HOOK_OPS:
        want = 1 if op in APPLY_HOOKS else 0
        if code not in (0, want):
            row["violations"].append("k=%d: exit %s (documented: %d)" % (k, code, want))
        if len(lines) > 1 or (code == 1 and not lines) or any("Traceback" in line for line in lines):
            row["violations"].append("k=%d: stderr is not one line: %r" % (k, err))
    elif code != 0 or lines:
        row["violations"].append("k=%d: daemon operation exited %s: %r" % (k, code, err))


def table(rows):
    out = ["%-10s %4s %-6s %-8s %7s %6s %10s" % ("operation", "nics", "mode", "point", "points", "dirty",
                                                 "violations")]
    for row in rows:
        point = row["kind"] if row["mode"] == "crash" else row["errno"]
        op = row["op"] + ("+br" if row.get("bridge_vlan") is not None else "")
        out.append("%-10s %4d %-6s %-8s %7d %6d %10d" % (op, row["nics"], row["mode"], point, row["points"],
                                                       row["dirty"], len(row["violations"])))
    total = sum(r["points"] for r in rows)
    out.append("total: %d points, %d violations" % (total, sum(len(r["violations"]) for r in rows)))
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nics", default="1,4")
    parser.add_argument("--ops", default=None, help="default: %s (also: %s)" % (",".join(OPS), ",".join(LOCKDOWN_OPS + ARMED_OPS)))
    parser.add_argument("--faults", default="EINVAL,EBUSY,ENOBUFS", help="errno names for fault rows ('' none)")
    parser.add_argument("--fault-nics", default=None, help="NIC counts that get fault rows (default: all)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--bridge-vlan", action="store_true",
                        help="the config turns the bridge's vlan_filtering on (ops default: %s)" % ",".join(BRIDGE_OPS))
    args = parser.parse_args(argv)
    ops = [o for o in (args.ops if args.ops is not None else
                       ",".join(BRIDGE_OPS if args.bridge_vlan else OPS)).split(",") if o]
    # Imported before forking: every child starts with them loaded.
    import fdbhook.cli  # noqa: F401
    import fdbhook.engine  # noqa: F401
    import fdbhook.kernel  # noqa: F401
    from pyroute2 import IPBatch  # noqa: F401

    workdir = tempfile.mkdtemp(prefix="fdbhook-crash-")
    conf = os.path.join(workdir, "fdbhook.conf")
    with open(conf, "w") as handle:
        handle.write("[manage]\nbridges = %s\n" % BRIDGE)
        if args.bridge_vlan:
            handle.write("[bridge %s]\nvlan_filtering = on\n" % BRIDGE)
    rows = []
    started = time.monotonic()
    try:
        for n in [int(x) for x in args.nics.split(",") if x]:
            bench = Bench(n, workdir, bridge_vlan=args.bridge_vlan)
            os.environ.update(FDBHOOK_CONF=conf, FDBHOOK_STATE_DIR=bench.state,
                              FDBHOOK_LOG=os.path.join(workdir, "log%d" % n))
            fault_nics = args.fault_nics.split(",") if args.fault_nics is not None else [str(n)]
            errnos = [e for e in args.faults.split(",") if e] if str(n) in fault_nics else []
            for row in run_cases(bench, ops, ("kernel", "file"), errnos):
                row["bridge_vlan"] = bench.can_filter if args.bridge_vlan else None
                rows.append(row)
            bench.reset()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"rows": rows, "seconds": round(time.monotonic() - started, 1), "kernel": os.uname().release,
              "points": sum(r["points"] for r in rows), "violations": sum(len(r["violations"]) for r in rows)}
    print(table(rows))
    for row in rows:
        for problem in row["violations"][:5]:
            print("VIOLATION %s %s nics=%d %s: %s" % (row["op"], row["mode"], row["nics"], row["errno"] or row["kind"],
                                                      problem))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
