"""Crash and fault injection for 1-, 4- and 16-NIC domains: every kill point of every operation.

    sudo python3 bench/crash.py [--nics 1,4,16] [--faults EINVAL,EBUSY,ENOBUFS] [--fullkernel]

Runs tests/crashlab.py in a network namespace of its own (prefix fdbcrash-),
prints the table (operation, NICs, crash points, points that left damage
before recovery, violations after the next lifecycle event) and writes JSON
to bench/measured/DATE-crash.json. Target: 0 violations.

``--fullkernel`` adds the rows of a bridge fdbhook must switch (crashlab
--bridge-vlan: the first start turns vlan_filtering on, the last stop puts it
back) inside Debian's full kernel under virtme-ng (tests/fullkernel/vng-run.sh),
as this machine's kernel cannot filter VLANs; those rows say "+br".
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RUNNER = os.path.join(REPO, "tests", "fullkernel", "vng-run.sh")


def run_here(nics, faults, prefix, bridge_vlan=False):
    """crashlab in a Lab namespace of this kernel: (its JSON, the finished process)."""
    from fdbhook.lab import Lab

    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    extra = ["--bridge-vlan"] if bridge_vlan else []
    with Lab(prefix=prefix) as lab:
        argv = lab.exec_argv([sys.executable, "-m", "tests.crashlab", "--nics", nics, "--faults", faults,
                              "--json", out] + extra)
        res = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, cwd=REPO)
    with open(out) as handle:
        data = json.load(handle) if os.path.getsize(out) else {"rows": [], "seconds": 0, "points": 0,
                                                               "violations": 1, "error": res.stderr[-2000:]}
    os.unlink(out)
    return data, res


def run_fullkernel(nics, faults):
    """The --bridge-vlan rows inside Debian's full kernel (virtme-ng): crashlab's JSON, or None (say why)."""
    shared = tempfile.mkdtemp(prefix="fdbcrash-fk-")
    out = os.path.join(shared, "out.json")
    command = ("modprobe -a bridge tun veth && cd %s && /usr/bin/python3 bench/crash.py --inner-bridge-vlan "
               "--nics %s --faults '%s' --json-out %s" % (REPO, nics, faults, out))
    res = subprocess.run([RUNNER, "run", command], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                         env=dict(os.environ, VNG_RUN_RWDIR=shared, VNG_RUN_TIMEOUT="3000"))
    try:
        with open(out) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        print("full kernel: no result (exit %d): %s" % (res.returncode, (res.stdout + res.stderr)[-3000:]))
        return None
    finally:
        subprocess.run(["rm", "-rf", shared])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nics", default="1,4,16")
    parser.add_argument("--faults", default="EINVAL,EBUSY,ENOBUFS")
    parser.add_argument("--prefix", default="fdbcrash")
    parser.add_argument("--fullkernel", action="store_true", help="add the bridge-switch rows under Debian's kernel")
    parser.add_argument("--fullkernel-nics", default="1,4")
    parser.add_argument("--inner-bridge-vlan", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from tests.crashlab import table

    if args.inner_bridge_vlan:  # inside the virtme-ng guest
        data, res = run_here(args.nics, args.faults, args.prefix, bridge_vlan=True)
        if data["violations"]:
            data["output"] = res.stdout[-4000:]
        with open(args.json_out, "w") as handle:
            json.dump(data, handle)
        return 0

    data, res = run_here(args.nics, args.faults, args.prefix)
    if data["violations"]:
        print(res.stdout[-4000:])
    data["kernel"] = os.uname().release
    if args.fullkernel:
        full = run_fullkernel(args.fullkernel_nics, args.faults)
        if full is not None:
            if full["violations"]:
                print(full.get("output", ""))
            data["fullkernel"] = {"kernel": full.get("kernel"), "seconds": full["seconds"],
                                  "points": full["points"], "violations": full["violations"]}
            data["rows"].extend(full["rows"])
            data["points"] += full["points"]
            data["violations"] += full["violations"]
    print(table(data["rows"]))
    print("%d crash/fault points, %d violations (this kernel: %.0f s%s)" % (
        data["points"], data["violations"], data["seconds"],
        "; full kernel %s: %d points in %.0f s" % (data["fullkernel"]["kernel"], data["fullkernel"]["points"],
                                                   data["fullkernel"]["seconds"]) if "fullkernel" in data else ""))
    name = os.path.join(REPO, "bench", "measured", "%s-crash.json" % datetime.date.today().isoformat())
    with open(name, "w") as handle:
        json.dump(data, handle, indent=1)
    print("wrote", name)
    return 1 if data["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
