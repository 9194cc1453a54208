"""Crash and fault injection for 1-, 4- and 16-NIC domains: every kill point of every operation.

    sudo python3 bench/crash.py [--nics 1,4,16] [--faults EINVAL,EBUSY,ENOBUFS]

Runs tests/crashlab.py in a network namespace of its own (prefix fdbcrash-),
prints the table (operation, NICs, crash points, points that left damage
before recovery, violations after the next lifecycle event) and writes JSON
to bench/measured/DATE-crash.json. Target: 0 violations.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nics", default="1,4,16")
    parser.add_argument("--faults", default="EINVAL,EBUSY,ENOBUFS")
    parser.add_argument("--prefix", default="fdbcrash")
    args = parser.parse_args()
    from fdbhook.lab import Lab
    from tests.crashlab import table

    out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    with Lab(prefix=args.prefix) as lab:
        argv = lab.exec_argv([sys.executable, "-m", "tests.crashlab", "--nics", args.nics, "--faults", args.faults,
                              "--json", out])
        res = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
    with open(out) as handle:
        data = json.load(handle)
    os.unlink(out)
    print(table(data["rows"]))
    print("%d crash/fault points in %.0f s, %d violations" % (data["points"], data["seconds"], data["violations"]))
    if data["violations"]:
        print(res.stdout[-4000:])
    data["kernel"] = os.uname().release
    name = os.path.join(REPO, "bench", "measured", "%s-crash.json" % datetime.date.today().isoformat())
    with open(name, "w") as handle:
        json.dump(data, handle, indent=1)
    print("wrote", name)
    return 1 if data["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
