"""fdbhook as a Debian package (issue 19): lintian-clean; on fresh Debian 12 and 13 trees install.sh
--deb installs it with apt and restarts the hand-started libvirtd (Debian 13: its sysvinit script
does not know that daemon, install.sh falls back to the pid-file restart), `fdbhook status` says
what a new user needs, its hooks manage a real QEMU guest's port, an upgrade keeps the admin's conffile, and
`apt purge` leaves the tree's file list exactly as it was before the install (piuparts' check).

The trees are tests/stacks.py's cached mmdebstrap userlands (never written: every host is an
overlay of its own, with its own namespaces, libvirtd and QEMU; no network needed).
"""

import os
import shutil
import subprocess
import tempfile

import pytest

from tests.package.conftest import UPGRADE_CONF_LINE, UPGRADE_VERSION, unavailable

pytestmark = pytest.mark.package

# What is not the package's business in the file list: the work tree copy, this test's files, dpkg/apt's own
# records and caches, logs of apt and libvirt, libvirt's runtime state (piuparts ignores the same).
IGNORE = (r"^/(src|root/pk-debs|root/pk-work)(/|$)|^/var/lib/(apt|dpkg|libvirt)/|^/var/cache/(apt|debconf|ldconfig|libvirt)/"
          r"|^/var/log/(apt/|dpkg\.log|alternatives\.log|libvirt/)")

SCRIPT = r"""
set -euo pipefail
mkdir /root/pk-work
snapshot() {
    find / -xdev -path /src -prune -o -print | grep -Ev '%(ignore)s' | LC_ALL=C sort >"$1"
}
say() { echo "== $*"; }
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confold "$@"
}
export LIBVIRTD_KEEP_CGROUP2=1  # QEMU only (no umount in the tree; LXC is what needs it gone)
/src/tests/system/libvirtd-up.sh >/dev/null
ip link add pkbr0 type bridge
ip link add pkup0 type veth peer name pkup1
ip link set pkup0 master pkbr0
for l in pkbr0 pkup0 pkup1; do ip link set "$l" up; done
snapshot /root/pk-work/before.list

say install: install.sh --deb, --bridges, --restart of a hand-started libvirtd
pid0=$(cat /run/libvirtd.pid)
/src/install.sh --deb /root/pk-debs/first/*.deb --bridges pkbr0 --restart 2>&1 | tee /root/pk-work/install.txt
pid1=$(cat /run/libvirtd.pid)
[ "$pid0" != "$pid1" ] && grep -q "libvirtd restarted" /root/pk-work/install.txt
for d in qemu lxc network; do
    grep -q fdbhook-hook /etc/libvirt/hooks/$d
    cmp /usr/share/fdbhook/hooks/$d /etc/libvirt/hooks/$d
done
grep -qx "bridges = pkbr0" /etc/fdbhook/fdbhook.conf
say status, nothing managed yet
fdbhook status | tee /root/pk-work/status-first.txt
grep -q "bridges matching 'pkbr0': pkbr0 (1 port)" /root/pk-work/status-first.txt
grep -q "libvirtd: running since after the hooks were installed" /root/pk-work/status-first.txt
grep -q "libvirt daemon: Debian package $(dpkg-query -W -f='${Version}' libvirt-daemon)" /root/pk-work/status-first.txt

say guest
cat >/root/pk-work/pk.xml <<'XML'
<domain type='qemu'><name>pk-guest</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
<on_poweroff>destroy</on_poweroff><devices>
<interface type='bridge'><source bridge='pkbr0'/><mac address='52:54:00:9c:19:01'/>
<target dev='pkt0'/><model type='virtio'/><rom enabled='no'/></interface>
<memballoon model='none'/></devices></domain>
XML
virsh -q -c qemu:///system create /root/pk-work/pk.xml
bridge -d link show dev pkt0 | tee /root/pk-work/port.txt
grep -q "learning off" /root/pk-work/port.txt && grep -q "flood off" /root/pk-work/port.txt
bridge fdb show dev pkt0 | tee /root/pk-work/fdb.txt
grep "^52:54:00:9c:19:01 " /root/pk-work/fdb.txt | grep -v permanent | grep -q static
fdbhook status | grep -q "qemu/pk-guest"
virsh -q -c qemu:///system destroy pk-guest
bridge -d link show dev pkt0 2>/dev/null | grep -q "learning off" && exit 3 || true

say upgrade
apt_install /root/pk-debs/upgrade/*.deb
[ "$(dpkg-query -W -f='${Version}' fdbhook)" = "%(version)s" ]
grep -qx "bridges = pkbr0" /etc/fdbhook/fdbhook.conf
if grep -qF "%(conf_line)s" /etc/fdbhook/fdbhook.conf; then echo "conffile overwritten"; exit 4; fi
grep -qF "%(conf_line)s" /etc/fdbhook/fdbhook.conf.dpkg-dist
cmp /usr/share/fdbhook/hooks/qemu /etc/libvirt/hooks/qemu

say purge
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q fdbhook
snapshot /root/pk-work/after.list
say "diff of the file list, before install vs after purge:"
diff /root/pk-work/before.list /root/pk-work/after.list && say "empty"
"""


@pytest.mark.parametrize("stack", ["bookworm", "trixie"])
def test_install_guest_upgrade_purge_leaves_nothing(packages, stack):
    from tests import stacks

    if not shutil.which("mmdebstrap") and not os.path.isdir(stacks.CACHE):
        unavailable("mmdebstrap is not installed (apt install mmdebstrap)")
    host = stacks.Host(stack, name="pk-" + stack, tree="worktree")
    try:
        host.enter()
    except RuntimeError as exc:
        unavailable("no %s tree: %s" % (stack, exc))
    try:
        root = "/proc/%d/root" % host.anchor
        for kind in ("first", "upgrade"):
            os.makedirs(root + "/root/pk-debs/" + kind)
            shutil.copy(packages["deb" if kind == "first" else "upgrade"], root + "/root/pk-debs/" + kind)
        script = SCRIPT % {"ignore": IGNORE, "version": UPGRADE_VERSION, "conf_line": UPGRADE_CONF_LINE}
        out = host.run(["bash", "-c", script], cwd="/", check=False, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=600)
        print(out.stdout)
        assert out.returncode == 0, out.stdout[-6000:]
        assert out.stdout.rstrip().endswith("== empty")
    finally:
        host.teardown()


def test_lintian_pedantic_has_no_error_and_no_warning(packages):
    if not shutil.which("lintian"):
        unavailable("lintian is not installed (apt install lintian)")
    out = subprocess.run(["lintian", "--pedantic", "-I", "--tag-display-limit", "0", packages["changes"]],
                         capture_output=True, text=True, timeout=600)
    print(out.stdout + out.stderr)
    bad = [line for line in out.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert bad == [] and out.returncode == 0, out.stdout + out.stderr


def test_piuparts_installs_and_purges_it_on_debian_12(packages):
    """Debian's own piuparts (install, remove, purge in a fresh minbase chroot, every file checked).

    Its base tarball is built once with mmdebstrap and cached with the stacks' trees
    (about 20 s); piuparts itself takes about 16 s. The package's dependencies come
    from Debian's archive (tests/run's other apt installs need it too).
    """
    from tests import stacks

    if not shutil.which("piuparts") or not shutil.which("mmdebstrap"):
        unavailable("piuparts or mmdebstrap is not installed (apt install piuparts mmdebstrap)")
    base = os.path.join(stacks.CACHE, "piuparts-bookworm-minbase.tar.gz")
    if not os.path.exists(base):
        os.makedirs(stacks.CACHE, exist_ok=True)
        out = subprocess.run(["mmdebstrap", "--variant=minbase", "bookworm", base + ".tmp.tar.gz", stacks.MIRROR],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        os.rename(base + ".tmp.tar.gz", base)
    work = tempfile.mkdtemp(prefix="fdbhook-piuparts-", dir="/var/tmp")
    try:
        # The chroot resolves the archive as this machine does (a stacks host: through its relay,
        # named in /etc/hosts only); piuparts itself ignores /etc/hosts in its file checks.
        scripts = os.path.join(work, "scripts")
        os.makedirs(scripts)
        with open("/etc/hosts") as handle:
            hosts = handle.read()
        with open(os.path.join(scripts, "post_chroot_unpack_hosts"), "w") as handle:
            handle.write("#!/bin/sh\ncat >/etc/hosts <<'FDBHOOK_EOF'\n%sFDBHOOK_EOF\n" % hosts)
        os.chmod(os.path.join(scripts, "post_chroot_unpack_hosts"), 0o755)
        out = subprocess.run(["piuparts", "-d", "bookworm", "-m", stacks.MIRROR, "-b", base, "-t", work,
                              "--scriptsdir", scripts, packages["deb"]], capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = (out.stdout + out.stderr).splitlines()
    print("\n".join(line for line in lines if "PASS" in line or "FAIL" in line or " ERROR: " in line))
    assert out.returncode == 0 and any("PASS: All tests." in line for line in lines), "\n".join(lines[-80:])
