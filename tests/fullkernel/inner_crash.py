"""Runs INSIDE Debian's full kernel under virtme-ng (see test_fullkernel.py).

A bridge whose vlan_filtering fdbhook must switch (off -> on at the first
managed guest's start): tests/crashlab.py --bridge-vlan kills the real start
hook after each of its kernel requests and state-file writes, runs the next
lifecycle event and checks the invariant, bridge included. This machine's
own kernel cannot filter VLANs, so only here does the switch really happen.
Kept small (QEMU without KVM is slow); bench/crash.py --fullkernel runs the
last guest's stop (the switch back), 4 NICs and kernel errors too.
"""

import json
import os
import subprocess
import sys

import pytest

from fdbhook.lab import Lab

pytestmark = pytest.mark.skipif(
    "virtme" not in open("/proc/cmdline").read() and os.environ.get("FDBHOOK_FULLKERNEL_FORCE") != "1",
    reason="only inside the virtme-ng guest kernel (tests/fullkernel/test_fullkernel.py runs it)")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_kill_at_every_step_of_switching_the_bridge_leaves_it_switched_with_a_record_or_as_it_was(tmp_path):
    out = tmp_path / "crash.json"
    with Lab(prefix="fdbfkc") as lab:
        argv = lab.exec_argv([sys.executable, "-m", "tests.crashlab", "--bridge-vlan", "--nics", "1",
                              "--ops", "start", "--faults", "", "--json", str(out)])
        res = subprocess.run(argv, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, capture_output=True,
                             text=True, stdin=subprocess.DEVNULL, timeout=900)
    assert out.exists(), res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    print(res.stdout)
    assert data["violations"] == 0, res.stdout[-4000:]
    assert all(row["bridge_vlan"] for row in data["rows"]), "this kernel did not switch the bridge"
    rows = {(row["op"], row["kind"]): row for row in data["rows"]}
    assert rows[("start", "file")]["points"] >= 2
    # the bridge's own request is a kill point of the first start: a port's requests follow it
    assert rows[("start", "kernel")]["points"] >= 4 and rows[("start", "kernel")]["dirty"] == \
        rows[("start", "kernel")]["points"]
