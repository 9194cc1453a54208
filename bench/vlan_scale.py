"""VLAN-filtering bridges at scale (issue 20): one guest's start+stopped, and a full resync.

Run as root: ``bench/vlan_scale.py`` boots each Debian kernel (6.1, 6.12)
under virtme-ng (tests/fullkernel/vng-run.sh; this machine's kernel has no
bridge VLAN filtering) and runs ``--inner`` there, then measures the native
resync here. Prints a table and writes bench/measured/DATE-vlan-scale.json.

Inside one boot:

* scale: a VLAN-filtering bridge with 10, 100 and 1,000 other ports, each
  carrying 4 VLANs; one guest (access VLAN 42, trunk 100-101) started and
  stopped through the engine as fdbhookd runs it (one long-lived adapter),
  median of REPEAT. Baseline, same boot, same bridge: the adapter as it was
  before issue 20 (VLANs from the AF_BRIDGE link dump of every port, a
  VXLAN-port dump whatever the drivers).
* resync: PORTS ports x 4 MACs (4 NICs a domain, 3 extra MACs each) on a
  VLAN-filtering bridge and on a non-filtering one, applied, then
  ``engine.resync`` timed (nothing to repair). Under TCG (no KVM in the
  nested guest) absolute times are several times native; the native
  non-filtering number is measured on this machine's own kernel.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from fdbhook import kernel as K  # noqa: E402
from fdbhook.config import parse_config  # noqa: E402
from fdbhook.domxml import parse_domain  # noqa: E402
from fdbhook.engine import apply_domain, resync, teardown_domain  # noqa: E402
from fdbhook.lab import Lab, in_netns  # noqa: E402
from fdbhook.state import Store  # noqa: E402

MARKER = "VLAN_SCALE_JSON: "
GUEST = ("<domain type='kvm'><name>vs1</name><metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>"
         "<fdb:interface mac='52:54:00:7a:00:01' vlan='42' trunk='100-101'/></fdb:fdb></metadata><devices>"
         "<interface type='bridge'><mac address='52:54:00:7a:00:01'/><source bridge='br0'/><target dev='vnetx'/>"
         "<alias name='net0'/></interface></devices></domain>").encode()


def batch(lab, tool, lines):
    subprocess.run([tool, "-n", lab.ns, "-batch", "-"], input="\n".join(lines).encode(), check=True,
                   stdout=subprocess.DEVNULL)


def old_adapter(kernel):
    """The adapter's reads as before issue 20: every port's VLANs at once, always the VXLAN-port dump."""
    kernel._old_vlan_dump = True
    K.vxlan_driver_loaded = lambda: True


def new_adapter(kernel):
    K.vxlan_driver_loaded = VXLAN_DRIVER_LOADED


VXLAN_DRIVER_LOADED = K.vxlan_driver_loaded


def scale(sizes, repeat, old_repeat):
    """Median ms of one guest's start+stopped beside N ports of 4 VLANs, N in SIZES: [{others, new, old}].

    Every size has its own namespace, built first; then the runs go round
    the sizes and variants in turn, so that the load of this shared machine
    falls on every figure alike.
    """
    import contextlib
    config = parse_config("[manage]\nbridges = br0\n", env={})
    dom = parse_domain(GUEST)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        runs = []
        for others in sizes:
            lab = stack.enter_context(Lab(prefix="fdbvs"))
            lab.add_bridge("br0")
            lab.ip("link", "set", "br0", "type", "bridge", "vlan_filtering", "1")
            batch(lab, "ip", [line for i in range(others) for line in
                              ("tuntap add o%d mode tap" % i, "link set o%d master br0" % i)]
                  + ["tuntap add vnetx mode tap", "link set vnetx master br0"])
            batch(lab, "bridge", ["vlan add vid 10-13 dev o%d" % i for i in range(others)])
            for variant in ("new", "old"):
                with in_netns(lab.ns):
                    kernel = stack.enter_context(K.Kernel())
                runs.append(dict(others=others, variant=variant, lab=lab, kernel=kernel, samples=[],
                                 store=Store(os.path.join(tmp, "%d-%s" % (others, variant)))))

        def once(run):
            (old_adapter if run["variant"] == "old" else new_adapter)(run["kernel"])
            try:
                with in_netns(run["lab"].ns):
                    started = time.perf_counter()
                    report = apply_domain(dom, config, run["kernel"], run["store"])
                    assert [r.status for r in report.results] == ["changed"], report.one_line()
                    teardown_domain("qemu", "vs1", run["kernel"], run["store"])
                    return (time.perf_counter() - started) * 1000
            finally:
                new_adapter(run["kernel"])

        for run in runs:
            once(run)  # the first run warms the adapter up (fdbhookd's steady state)
        for i in range(repeat):
            for run in runs:
                if run["variant"] == "new" or i < old_repeat:
                    run["samples"].append(once(run))
        out = []
        for others in sizes:
            row = {"others": others}
            for run in runs:
                if run["others"] == others:
                    row[run["variant"]] = round(statistics.median(run["samples"]), 1)
                    row[run["variant"] + "_runs"] = len(run["samples"])
            out.append(row)
    return out


BRIDGE_PORTS = 512  # a bridge takes at most 1,023 ports (BR_MAX_PORTS): 4,096 ports need several bridges


def resync_ports(nports, filtering, repeat, lab=None):
    """Resync of NPORTS ports x 4 MACs: {"ports", "macs", "filtering", "apply_s", "resync_s", ...}."""
    if lab is None:
        with Lab(prefix="fdbvr") as lab:
            return resync_ports(nports, filtering, repeat, lab)
    per = 4
    nbridges = (nports + BRIDGE_PORTS - 1) // BRIDGE_PORTS
    # Both variants in one namespace, on bridges and taps of their own: deleting a namespace with
    # thousands of devices takes minutes under TCG, and holds up the next `ip netns add`.
    tag = "f" if filtering else "n"
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(nbridges):
            lab.add_bridge("%sbr%d" % (tag, b))
            if filtering:
                lab.ip("link", "set", "%sbr%d" % (tag, b), "type", "bridge", "vlan_filtering", "1")
        batch(lab, "ip", [line for i in range(nports) for line in
                          ("tuntap add %s%d mode tap" % (tag, i), "link set %s%d master %sbr%d" % (
                              tag, i, tag, i // BRIDGE_PORTS))])
        config = parse_config("[manage]\nbridges = %s\n" % " ".join("%sbr%d" % (tag, b) for b in range(nbridges)),
                              env={})
        store = Store(os.path.join(tmp, "state"))

        def mac(i, j):
            return "52:%s:%02x:%02x:%02x:%02x" % ("54" if filtering else "55", j, i >> 16, (i >> 8) & 255, i & 255)

        with in_netns(lab.ns):
            kernel = K.Kernel()
            try:
                started = time.perf_counter()
                for d in range(nports // per):
                    meta, nics = [], []
                    for i in range(d * per, (d + 1) * per):
                        meta.append("<fdb:interface mac='%s' extra-macs='%s'/>" % (
                            mac(i, 0), " ".join(mac(i, j) for j in (1, 2, 3))))
                        nics.append("<interface type='bridge'><mac address='%s'/><source bridge='%sbr%d'/>"
                                    "<target dev='%s%d'/><alias name='net%d'/></interface>" % (
                                        mac(i, 0), tag, i // BRIDGE_PORTS, tag, i, i % per))
                    xml = ("<domain type='kvm'><name>r%s%d</name><metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>%s"
                           "</fdb:fdb></metadata><devices>%s</devices></domain>" % (tag, d, "".join(meta), "".join(nics)))
                    report = apply_domain(parse_domain(xml.encode()), config, kernel, store)
                    assert all(r.status == "changed" for r in report.results), report.one_line()
                apply_s = time.perf_counter() - started
                samples, cpu = [], []
                for _ in range(repeat):
                    started, times = time.perf_counter(), os.times()
                    checked, repaired, failed = resync(kernel, store, config)
                    samples.append(time.perf_counter() - started)
                    after = os.times()
                    cpu.append((after.user - times.user, after.system - times.system))
                    assert (checked, repaired, failed) == (nports, 0, 0), (checked, repaired, failed)
            finally:
                kernel.close()
        entries = sum(1 for b in range(nbridges) for e in lab.fdb(br="%sbr%d" % (tag, b)) if e["state"] == "static")
    return {"ports": nports, "bridges": nbridges, "macs_per_port": per, "filtering": filtering,
            "static_entries": entries,
            "apply_s": round(apply_s, 2), "resync_s": round(statistics.median(samples), 3),
            "resync_runs": [round(s, 3) for s in samples],
            # where the time goes: Python (user) vs the kernel's netlink work in this process (system)
            "resync_user_s": round(statistics.median(u for u, _ in cpu), 3),
            "resync_system_s": round(statistics.median(s for _, s in cpu), 3)}


def inner(args):
    subprocess.run(["modprobe", "-a", "bridge", "tun"], check=True)
    result = {"kernel": os.uname().release, "vxlan_driver_loaded": K.vxlan_driver_loaded(), "repeat": args.repeat,
              "scale": [], "resync": []}
    result["scale"] = scale(args.others, args.repeat, args.old_repeat)
    print(MARKER + json.dumps(result), flush=True)  # printed again below: a later failure keeps these
    if args.resync_ports:
        with Lab(prefix="fdbvr") as lab:
            for filtering in (True, False):
                row = resync_ports(args.resync_ports, filtering, args.resync_repeat, lab)
                print("vlan_scale: %s" % row, file=sys.stderr, flush=True)
                result["resync"].append(row)
                print(MARKER + json.dumps(result), flush=True)


def in_full_kernel(kernel, args):
    runner = os.path.join(REPO, "tests", "fullkernel", "vng-run.sh")
    ports = args.resync_ports if kernel in args.resync_kernels.split(",") else 0
    command = "cd %s && /usr/bin/python3 bench/vlan_scale.py --inner --repeat %d --old-repeat %d --others %s " \
              "--resync-ports %d --resync-repeat %d" % (REPO, args.repeat, args.old_repeat,
                                                        " ".join(map(str, args.others)), ports, args.resync_repeat)
    proc = subprocess.run([runner, "run", command], capture_output=True, text=True, timeout=args.timeout + 120,
                          env=dict(os.environ, VNG_KERNEL=kernel, VNG_RUN_TIMEOUT=str(args.timeout),
                                   VNG_RUN_MEMORY="2G"))
    sys.stderr.write(proc.stderr[-2000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        return {"kernel": kernel, "skipped": "exit %d: %s" % (proc.returncode, (proc.stdout + proc.stderr)[-500:])}
    out = json.loads(lines[-1][len(MARKER):])
    if proc.returncode:
        out["incomplete"] = "exit %d: %s" % (proc.returncode, (proc.stdout + proc.stderr)[-500:])
    return out


def print_table(result):
    m = result["machine"]
    print("VLAN-filtering bridges, %s, %s, %d cores, host kernel %s" % (m["date"], m["cpu"], m["cores"], m["kernel"]))
    for run in result["full_kernel"]:
        if "skipped" in run:
            print("\n%s: skipped: %s" % (run["kernel"], run["skipped"]))
            continue
        print("\nDebian kernel %s under virtme-ng (TCG), vxlan driver loaded: %s" % (
            run["kernel"], run["vxlan_driver_loaded"]))
        print("one guest's start+stopped (access VLAN + trunk), median ms (runs interleaved across sizes)")
        print("%14s %18s %22s" % ("other ports", "fdbhook", "before issue 20"))
        base, old_base = run["scale"][0]["new"], run["scale"][0]["old"]
        for row in run["scale"]:
            print("%14d %7.1f (%4.2fx, n=%d) %9.1f (%4.2fx, n=%d)" % (
                row["others"], row["new"], row["new"] / base, row["new_runs"], row["old"], row["old"] / old_base,
                row["old_runs"]))
        if "incomplete" in run:
            print("(incomplete: %s)" % run["incomplete"][-200:])
        for row in run["resync"]:
            print("resync %d ports x %d MACs (%d bridges), vlan_filtering %s: %.3f s (TCG; user %s s, system %s s; "
                  "%d static entries, apply %.1f s)" % (
                      row["ports"], row["macs_per_port"], row["bridges"], "on " if row["filtering"] else "off",
                      row["resync_s"], row.get("resync_user_s", "?"), row.get("resync_system_s", "?"),
                      row["static_entries"], row["apply_s"]))
        on = [r for r in run["resync"] if r["filtering"]]
        off = [r for r in run["resync"] if not r["filtering"]]
        if on and off:
            print("resync filtering / non-filtering, same boot: %.2fx" % (on[0]["resync_s"] / off[0]["resync_s"]))
    native = result.get("native_resync")
    if native:
        print("\nnative (host kernel %s, no VLAN filtering): resync %d ports x %d MACs %.3f s (user %s s, system %s s)"
              % (m["kernel"], native["ports"], native["macs_per_port"], native["resync_s"],
                 native.get("resync_user_s", "?"), native.get("resync_system_s", "?")))
        estimate = result.get("native_filtering_estimate_s")
        if estimate is not None:
            print("native resync on VLAN-filtering bridges, estimated (native non-filtering x TCG ratio): %.3f s"
                  % estimate)
    print("\ntargets")
    for name, (value, target, ok) in result["targets"].items():
        print("  %-58s %8s  target %-7s %s" % (name, value, target, "met" if ok else "MISSED"))


def judge(result):
    checks = {}
    for run in result["full_kernel"]:
        if "skipped" in run:
            continue
        news = [row["new"] for row in run["scale"]]
        ratio = round(max(news) / min(news), 2)
        checks["%s: start+stopped largest/smallest" % run["kernel"]] = (ratio, "<= 1.2", ratio <= 1.2)
        for row in run["resync"]:
            if row["filtering"]:
                checks["%s: resync %d ports, filtering, TCG (s)" % (run["kernel"], row["ports"])] = (
                    row["resync_s"], "<= 2", row["resync_s"] <= 2.0)
    native = result.get("native_resync")
    for run in result["full_kernel"]:
        on = [r for r in run.get("resync", []) if r["filtering"]]
        off = [r for r in run.get("resync", []) if not r["filtering"]]
        if native and on and off and on[0]["ports"] == native["ports"]:
            # Not a measurement: this machine's kernel cannot filter. Same ports, same boot for the ratio.
            result["native_filtering_estimate_s"] = round(native["resync_s"] * on[0]["resync_s"] / off[0]["resync_s"],
                                                          3)
            estimate = result["native_filtering_estimate_s"]
            checks["resync %d ports, filtering, native estimate (s)" % native["ports"]] = (estimate, "<= 2",
                                                                                           estimate <= 2.0)
    result["targets"] = checks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", action="store_true", help="run inside the full kernel (vng-run.sh does)")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--old-repeat", type=int, default=3, help="runs of the baseline (3 s each at 1,000 ports)")
    parser.add_argument("--others", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--resync-ports", type=int, default=4096)
    parser.add_argument("--resync-repeat", type=int, default=3)
    parser.add_argument("--kernels", default="bookworm,trixie")
    parser.add_argument("--resync-kernels", default="bookworm",
                        help="kernels that also run the TCG resync (4,096 ports take minutes to set up under TCG)")
    parser.add_argument("--timeout", type=int, default=1500, help="seconds per boot")
    parser.add_argument("--out", default=None, help="JSON file (default bench/measured/DATE-vlan-scale.json)")
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return
    import platform
    with open("/proc/cpuinfo") as handle:
        cpu = next((ln.split(":", 1)[1].strip() for ln in handle if ln.startswith("model name")), "?")
    result = {"machine": {"date": time.strftime("%Y-%m-%d"), "kernel": platform.release(), "cpu": cpu,
                          "cores": os.cpu_count(), "load": os.getloadavg()[0]},
              "full_kernel": [in_full_kernel(k, args) for k in args.kernels.split(",") if k]}
    if args.resync_ports:
        result["native_resync"] = resync_ports(args.resync_ports, False, args.resync_repeat)
    result["machine"]["load_after"] = os.getloadavg()[0]
    judge(result)
    print_table(result)
    out = args.out or os.path.join(HERE, "measured", "%s-vlan-scale.json" % result["machine"]["date"])
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1, sort_keys=True)
        handle.write("\n")
    print("\nwritten: %s" % out)


if __name__ == "__main__":
    main()
