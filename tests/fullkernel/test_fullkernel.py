"""Full-kernel tier: inner_vlan.py and inner_reads.py inside Debian's kernels under virtme-ng.

This machine's kernel has no bridge VLAN filtering and no bonding, so the
promiscuous-mode payoff can only be shown on a full distribution kernel.
vng-run.sh boots one (QEMU, TCG) with this machine's filesystem as root and
runs pytest on the inner files there (inner_crash.py: the bridge's
vlan_filtering switch killed at every step): once on Debian 12's 6.1, once on
Debian 13's 6.12 (VNG_KERNEL=trixie; vng-run.sh setup unpacks it).
"""

import os
import re
import subprocess

import pytest

pytestmark = [pytest.mark.fullkernel, pytest.mark.root]
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RUNNER = os.path.join(HERE, "vng-run.sh")
# tests/run set the tier up successfully: from then on a skip would hide a failure.
REQUIRED = os.environ.get("FDBHOOK_FULLKERNEL_REQUIRED") == "1"
INNER = ["tests/fullkernel/inner_vlan.py", "tests/fullkernel/inner_reads.py", "tests/fullkernel/inner_crash.py"]


def _debian_major():
    try:
        with open("/etc/debian_version") as handle:
            return handle.read().split(".")[0].strip()
    except OSError:
        return ""


def unavailable(reason):
    if REQUIRED:
        pytest.fail(reason + " (tests/run set the full-kernel tier up, so this is a failure)", pytrace=False)
    pytest.skip(reason)


@pytest.mark.parametrize("kernel, release", [("bookworm", "6.1."), ("trixie", "6.12.")])
def test_vlan_filtering_bridge_on_debian_kernel(kernel, release):
    env = dict(os.environ, VNG_KERNEL=kernel, VNG_RUN_TIMEOUT="900")
    check = subprocess.run([RUNNER, "check"], capture_output=True, text=True, timeout=60, env=env)
    if check.returncode == 77:
        unavailable("full-kernel tier (%s) unavailable: %s" % (kernel, (check.stdout + check.stderr).strip()))
    command = ("cd %s && echo \"guest kernel: $(uname -r)\" && /usr/bin/python3 -m pytest -q -p no:cacheprovider "
               "-s -rA --durations=8 %s" % (REPO, " ".join(INNER)))
    result = subprocess.run([RUNNER, "run", command], capture_output=True, text=True, timeout=1200, env=env)
    output = result.stdout + result.stderr
    if result.returncode == 125 and re.search(r"qemu-system-\S+: \S+: .*Assertion", output):
        # QEMU itself died under TCG (seen once with Debian 13's QEMU 10: "iotlb_to_section:
        # Assertion ... failed"), before the guest reported anything: the emulator's crash, not
        # a result of the tests inside. One more boot; a second crash fails the test.
        print("full-kernel tier (%s): QEMU crashed, booting once more:\n%s" % (kernel, output[-600:]))
        result = subprocess.run([RUNNER, "run", command], capture_output=True, text=True, timeout=1200, env=env)
        output = result.stdout + result.stderr
    if result.returncode == 77:
        unavailable("full-kernel tier (%s) unavailable: %s" % (kernel, output.strip()[-300:]))
    assert result.returncode == 0, output[-4000:]
    # "bookworm" is the machine's own Debian kernel from /boot: Debian 12's 6.1 on a
    # Debian 12 host (CI), the host's own elsewhere (6.12 on a Debian 13 host).
    picked = subprocess.run([RUNNER, "kernel"], capture_output=True, text=True, timeout=60, env=env).stdout
    version = picked.strip().rsplit("vmlinuz-", 1)[-1]
    assert "guest kernel: " + version in output, (picked, output[-1000:])
    if kernel == "trixie" or _debian_major() == "12":
        assert "guest kernel: " + release in output
    assert "5 passed" in output, output[-4000:]
    assert "bond0 promiscuity: 1 -> 0" in output
    print(output[-1500:])
