#!/usr/bin/env python3
"""The long soak (issue 18): 1,000+ seeded random lifecycle operations against a private libvirtd.

    sudo python3 bench/soak.py [--ops 1000] [--seed S] [--qemu 2] [--lxc 2] [--out bench/measured/soak-DATE.json]

tests/soak.py does the work (its docstring lists the operations and the
invariant); this prints a table and writes the counts and violations as JSON.
It goes on after a violation (each is recorded with its operation number).
"""

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import soak  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--qemu", type=int, default=2)
    parser.add_argument("--lxc", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    why = soak.available()
    if why:
        print("bench/soak.py: cannot run: %s" % why, file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print("soak: seed %d, %d operations, %d QEMU + %d LXC guests" % (seed, args.ops, args.qemu, args.lxc))
    summary = soak.soak(args.ops, seed, args.qemu, args.lxc, stop_on_violation=False)
    print("%-24s %8s" % ("operation", "count"))
    for op, count in sorted(summary["counts"].items()):
        print("%-24s %8d" % (op, count))
    print("%-24s %8d" % ("total", summary["ops"]))
    print("%-24s %8d" % ("violations", len(summary["violations"])))
    print("%-24s %8.1f" % ("seconds", summary["seconds"]))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "measured",
                                   "soak-%s.json" % time.strftime("%Y-%m-%d"))
    summary["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(out, "w") as handle:
        json.dump(summary, handle, indent=1, sort_keys=True)
        handle.write("\n")
    print("written: %s" % out)
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
