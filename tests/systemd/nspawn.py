"""A Debian 12 container booted with systemd as PID 1 (systemd-nspawn -b), for the systemd tier.

The userland is an mmdebstrap tree cached under /var/cache/fdbhook-tests
(built once, about 80 s; its name carries a hash of the package list, so a
new list builds a new tree). Each boot runs on an overlay of it in a
private mount namespace (``unshare -m``): the cached tree is never written
and nothing stays mounted when the container is gone. The container has its
own network namespace (``--private-network``: only ``lo`` until the tests
create bridges and veths inside), its own PID namespace with systemd as PID
1, and the repository bind-mounted read-only at /src. Commands run inside
through ``nsenter`` into all of its namespaces.

Not registered with machined (``--register=no``): the host runs no systemd.
"""

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "procps", "iproute2", "man-db", "bash-completion",
    "libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients", "qemu-system-x86", "dnsmasq-base",
    # What install.sh installs: present in the tree, since the container has no network.
    "python3", "python3-venv", "python3-pip", "python3-setuptools", "python3-wheel", "python3-lxml",
    "python3-pyroute2", "python3-libvirt", "python3-systemd", "python3-prometheus-client",
)
CACHE = "/var/cache/fdbhook-tests"
MACHINE = "fdbhook-sd"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
       "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Unavailable(Exception):
    """This machine cannot boot the container (and why)."""


def missing_tools():
    return [tool for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "unshare") if not shutil.which(tool)]


def tree_path():
    key = hashlib.sha256(("%s %s" % (SUITE, " ".join(PACKAGES))).encode()).hexdigest()[:12]
    return os.path.join(CACHE, "systemd-%s-%s" % (SUITE, key))


def ensure_tree(log=print):
    """The cached userland, built with mmdebstrap if missing (into a temporary name, then renamed)."""
    path = tree_path()
    if os.path.isfile(os.path.join(path, "usr/lib/systemd/systemd")):
        return path
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    cmd = ["mmdebstrap", "--variant=apt", "--aptopt=APT::Install-Recommends \"false\"",
           "--include=" + ",".join(PACKAGES), SUITE, tmp, MIRROR]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unavailable("mmdebstrap failed: %s" % out.stderr.strip().splitlines()[-3:])
    os.rename(tmp, path)
    log("systemd tier: built %s in %.0f s" % (path, time.monotonic() - started))
    return path


class Container:
    """One booted container. ``sh`` runs a command inside; ``close`` powers it off."""

    def __init__(self, tree, workdir):
        self.tree = tree
        self.workdir = workdir
        self.console = os.path.join(workdir, "console.log")
        self.proc = None
        self.leader = None

    def boot(self, timeout=90):
        merged, upper, work = (os.path.join(self.workdir, d) for d in ("merged", "upper", "work"))
        for d in (merged, upper, work):
            os.makedirs(d)
        script = ("mount -t overlay overlay -o lowerdir={tree},upperdir={upper},workdir={work} {merged} && "
                  "exec systemd-nspawn --quiet --register=no --keep-unit --private-network -M {name} "
                  "--bind-ro={repo}:/src -D {merged} -b").format(tree=self.tree, upper=upper, work=work,
                                                               merged=merged, name=MACHINE, repo=REPO)
        with open(self.console, "wb") as log:
            self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=ENV)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Unavailable("systemd-nspawn did not start a container: %s" % self.tail())
            self.leader = self._find_leader()
            time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded") and time.monotonic() < deadline:
            # Empty until PID 1 answers on its private socket; --wait then blocks until boot is done.
            state = self.sh("systemctl is-system-running --wait", check=False,
                            timeout=max(5, deadline - time.monotonic())).stdout.strip()
            if not state:
                time.sleep(0.2)
        if state not in ("running", "degraded"):
            raise Unavailable("systemd in the container is %r: %s" % (state, self.tail()))
        return state

    def _find_leader(self):
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as handle:
                children = handle.read().split()
            for pid in children:
                with open("/proc/%s/comm" % pid) as handle:
                    if handle.read().strip() == "systemd":
                        return int(pid)
        except OSError:
            pass
        return None

    def tail(self, lines=15):
        try:
            with open(self.console, errors="replace") as handle:
                return " | ".join(handle.read().splitlines()[-lines:])
        except OSError:
            return ""

    def sh(self, command, check=True, timeout=120, input=None):
        """Run ``command`` with bash inside the container (all its namespaces)."""
        out = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", "/bin/bash", "-c", command],
                             capture_output=True, text=True, timeout=timeout, env=ENV, input=input)
        if check and out.returncode != 0:
            raise AssertionError("in the container: %s\nexit %d\n%s%s" % (command, out.returncode, out.stdout,
                                                                          out.stderr))
        return out

    def poll(self, command, timeout=20.0, interval=0.2):
        """Run ``command`` until it exits 0; its result, or AssertionError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.sh(command, check=False)
            if out.returncode == 0:
                return out
            if time.monotonic() > deadline:
                raise AssertionError("not true within %.0f s: %s\n%s%s" % (timeout, command, out.stdout,
                                                                           out.stderr))
            time.sleep(interval)

    def close(self, timeout=30):
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGTERM: nspawn asks the container's systemd for an orderly poweroff.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextlib.contextmanager
def booted(log=print):
    """Build (or reuse) the tree, boot it, yield the Container; always powered off and removed after."""
    tree = ensure_tree(log)
    workdir = tempfile.mkdtemp(prefix="fdbhook-systemd-")
    box = Container(tree, workdir)
    try:
        started = time.monotonic()
        state = box.boot()
        log("systemd tier: container booted (%s) in %.1f s" % (state, time.monotonic() - started))
        yield box
    finally:
        box.close()
        shutil.rmtree(workdir, ignore_errors=True)
