"""Full-kernel tier: inner_vlan.py inside Debian's kernel under virtme-ng.

This machine's kernel has no bridge VLAN filtering and no bonding, so the
promiscuous-mode payoff can only be shown on a full distribution kernel.
vng-run.sh boots it (QEMU, TCG) with this machine's filesystem as root and
runs pytest on inner_vlan.py and inner_crash.py (the bridge's vlan_filtering
switch killed at every step) there.
"""

import os
import subprocess

import pytest

pytestmark = [pytest.mark.fullkernel, pytest.mark.root]
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RUNNER = os.path.join(HERE, "vng-run.sh")
# tests/run set the tier up successfully: from then on a skip would hide a failure.
REQUIRED = os.environ.get("FDBHOOK_FULLKERNEL_REQUIRED") == "1"


def unavailable(reason):
    if REQUIRED:
        pytest.fail(reason + " (tests/run set the full-kernel tier up, so this is a failure)", pytrace=False)
    pytest.skip(reason)


def test_vlan_filtering_bridge_uplink_leaves_promiscuous_mode():
    check = subprocess.run([RUNNER, "check"], capture_output=True, text=True, timeout=60)
    if check.returncode == 77:
        unavailable("full-kernel tier unavailable: %s" % (check.stdout + check.stderr).strip())
    command = ("cd %s && /usr/bin/python3 -m pytest -q -p no:cacheprovider -s -rA "
               "tests/fullkernel/inner_vlan.py tests/fullkernel/inner_crash.py" % REPO)
    result = subprocess.run([RUNNER, "run", command], capture_output=True, text=True, timeout=1200,
                            env=dict(os.environ, VNG_RUN_TIMEOUT="900"))
    output = result.stdout + result.stderr
    if result.returncode == 77:
        unavailable("full-kernel tier unavailable: %s" % output.strip()[-300:])
    assert result.returncode == 0, output[-4000:]
    assert "2 passed" in output
    assert "bond0 promiscuity: 1 -> 0" in output
    print(output[-1500:])
