"""Other Debian releases as throwaway "hosts" on this kernel, for the system tier.

A stack is a Debian userland built with mmdebstrap from Debian's archive and
cached under /var/cache/fdbhook-tests/NAME-KEY/root, KEY a hash of everything
the build depends on (suite, variant, package list, options): change the list
and the next run builds afresh (and removes the older tree of that stack).

A ``Host`` runs commands in such a userland as if it were a machine of its own:

* an overlay mount of the cached tree (the cache is never written; every
  ``enter`` starts from the tree as built) whose root is a mount point (QEMU
  guests fail with "Failed disable mount propagation" in a plain chroot);
* its own mount, UTS, IPC and network namespaces (only ``lo``, no route out)
  and, by default, its own PID namespace; a fresh /proc and /sys (the sysfs of
  its own network namespace), /sys/fs/cgroup bound from the machine, its own
  /run and /tmp (tmpfs), a /dev of its own with only null, zero, full, random,
  urandom, tty, kvm and net/tun bound from the machine plus its own devpts;
* optionally TCP forwarders for named registry hosts (``forward``): inside,
  the name resolves (/etc/hosts) to a loopback address where a listener of
  this process relays to the real host from the machine's network namespace,
  so apt and pip work in a host that has no route out;
* the repository copied to /src (``tree``: the work tree or a git revision).

Nothing outside is touched: every mount lives only in the host's mount
namespace, daemons started inside (virtlogd, libvirtd, their QEMU guests) keep
their pid files and sockets in its /run, and ``teardown`` kills exactly the
processes whose root is this host's tree (a marker file with a per-host token
at its root, read through /proc/PID/root), then deletes the host's directory.

    python3 -m tests.stacks build trixie
    python3 -m tests.stacks run trixie [--share-pid] [--forward] [--tree HEAD] [--keep] -- CMD ARGS...

``run`` enters, runs CMD in /src with a clean service-like environment
(FDBHOOK_* and CI passed through), tears down and exits with CMD's status.
"""

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FDBHOOK_STACK_CACHE", "/var/cache/fdbhook-tests")
WORK = os.environ.get("FDBHOOK_STACK_WORK", "/var/tmp")  # where a host's upper layer goes
MIRROR = "http://deb.debian.org/debian"
MARKER = ".fdbhook-stack"
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECIPE_VERSION = 1  # bump when the build itself (not the package list) changes

# A host needs no archive at run time: its tree has what tests/run,
# tests/system/libvirtd-up.sh, install.sh and tests/guestos.py (a real guest
# from the stack's own Debian kernel, busybox, gcc) would install, read from
# those files (so a package added there rebuilds the tree), plus these.
TRIXIE_PACKAGES = (
    "libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-daemon-driver-lxc", "libvirt-clients",
    "qemu-system-x86", "dnsmasq-base", "iptables", "iproute2", "procps",
    "python3", "python3-venv", "python3-pip", "python3-setuptools", "python3-wheel",
    "python3-lxml", "python3-pyroute2", "python3-libvirt", "python3-pytest",
    "busybox-static", "linux-image-amd64", "gcc", "libc6-dev",
)
# tests/package: libvirt as libvirtd-up.sh wants it, and what the .deb depends on.
PACKAGE_TIER_PACKAGES = (
    "libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-daemon-driver-lxc", "libvirt-clients",
    "qemu-system-x86", "dnsmasq-base", "iptables", "iproute2",
    "python3", "python3-lxml", "python3-pyroute2", "python3-libvirt", "python3-systemd",
    "python3-prometheus-client",
)
# (file, pattern whose first group lists packages)
PACKAGE_SOURCES = (
    ("install.sh", r'^APT_PACKAGES="([^"]*)"'),
    ("tests/system/libvirtd-up.sh", r"^PKGS=\(([^)]*)\)"),
    ("tests/run", r"^\s*for pkg in ([^;]*); do"),
    ("tests/guestos.py", r"^APT = \(([^)]*)\)"),
)


def repo_packages():
    """The Debian packages this tree's scripts install, as they list them."""
    out = set()
    for rel, pattern in PACKAGE_SOURCES:
        try:
            with open(os.path.join(REPO, rel), encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            continue
        for match in re.finditer(pattern, text, re.M):
            out.update(w.strip("\"',") for w in match.group(1).split() if w.strip("\"',\\"))
    return tuple(sorted(out))


@dataclass(frozen=True)
class Stack:
    name: str
    suite: str
    variant: str  # mmdebstrap --variant: apt (Essential + apt), minbase (+ Priority required)
    packages: tuple = ()
    # Directories that outlive a host (bound read-write from CACHE/NAME-persist/...),
    # e.g. tests/guestos.py's cache of guest images.
    persist: tuple = ()

    def key(self):
        recipe = json.dumps([RECIPE_VERSION, self.suite, self.variant, sorted(self.packages), MIRROR])
        return hashlib.sha256(recipe.encode()).hexdigest()[:12]


STACKS = {
    # Debian 13: libvirt 11.3, Python 3.13, QEMU 10, pyroute2 0.7.7, lxml 5.4.
    "trixie": Stack("trixie", "trixie", "apt", tuple(sorted(set(TRIXIE_PACKAGES + repo_packages()))),
                    persist=("/var/cache/fdbhook-tests",)),
    # Debian 12 for the package tier (tests/package): libvirt 9.0 and the
    # package's dependencies, nothing of fdbhook's own.
    "bookworm": Stack("bookworm", "bookworm", "apt", tuple(sorted(PACKAGE_TIER_PACKAGES))),
    # A fresh minimal Debian 12 as container images have it: no procps,
    # no systemd, no sudo; everything else comes from the archive at run time.
    "bookworm-minimal": Stack("bookworm-minimal", "bookworm", "minbase"),
    # The same for Debian 13 (README's commands as a new user meets them).
    "trixie-minimal": Stack("trixie-minimal", "trixie", "minbase"),
}

# Names a forwarding host resolves to a loopback relay (apt, pip).
FORWARD = (("deb.debian.org", 80), ("pypi.org", 443), ("files.pythonhosted.org", 443))
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
STACK_CA = "/etc/ssl/fdbhook-stack-ca.crt"  # given to pip as PIP_CERT


def say(msg):
    print("stacks: %s" % msg, file=sys.stderr, flush=True)


def _lock(path, mode):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, mode)
    return fd


def _ensure_mmdebstrap():
    if shutil.which("mmdebstrap"):
        return
    say("installing mmdebstrap")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "install", "-y", "-q", "--no-install-recommends", "mmdebstrap"]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=900", "update", "-q"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def image(stack):
    """The cached tree of STACK (built now if missing), and a shared lock on it.

    Returns (root, lock_fd): hold lock_fd while the tree is in use; a build
    of a changed package list removes older trees only under the exclusive lock.
    """
    os.makedirs(CACHE, exist_ok=True)
    base = os.path.join(CACHE, "%s-%s" % (stack.name, stack.key()))
    root = os.path.join(base, "root")
    fd = _lock(os.path.join(CACHE, stack.name + ".lock"), fcntl.LOCK_SH)
    if os.path.isdir(root):
        return root, fd
    fcntl.flock(fd, fcntl.LOCK_EX)
    if not os.path.isdir(root):
        _build(stack, base)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return root, fd


def _build(stack, base):
    _ensure_mmdebstrap()
    tmp = base + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cmd = ["mmdebstrap", "--variant=" + stack.variant, "--aptopt=APT::Install-Recommends \"false\"",
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
           "--dpkgopt=path-exclude=/usr/share/locale/*"]
    if stack.packages:
        cmd.append("--include=" + ",".join(stack.packages))
    cmd += [stack.suite, os.path.join(tmp, "root"), MIRROR]
    say("building %s (%s, %d packages) into %s" % (stack.name, stack.suite, len(stack.packages), base))
    t0 = time.monotonic()
    with open(os.path.join(tmp, "build.log"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(os.path.join(tmp, "build.log")) as log:
            tail = log.read()[-3000:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError("mmdebstrap for %s failed (rc %d):\n%s" % (stack.name, proc.returncode, tail))
    with open(os.path.join(tmp, "recipe.json"), "w") as handle:
        json.dump({"suite": stack.suite, "variant": stack.variant, "packages": sorted(stack.packages),
                   "mirror": MIRROR, "seconds": round(time.monotonic() - t0, 1)}, handle)
    os.rename(tmp, base)
    say("built %s in %.0f s" % (stack.name, time.monotonic() - t0))
    for name in os.listdir(CACHE):  # the trees of older package lists
        old = os.path.join(CACHE, name)
        if name.startswith(stack.name + "-") and old != base and os.path.isdir(os.path.join(old, "root")):
            say("removing the outdated tree %s" % old)
            shutil.rmtree(old, ignore_errors=True)


# The host's first process: runs in the new namespaces (PID 1 of its own PID
# namespace unless shared), in the machine's root, from the machine's Python.
# It mounts the host's file systems, makes the tree the root, says "ready",
# then reaps orphans until it is killed (which, as PID 1, ends every process
# of the namespace).
ANCHOR = r"""
import ctypes, json, os, signal, socket, subprocess, sys
cfg = json.loads(sys.argv[1])
R = cfg["root"]
def sh(*argv):
    subprocess.run(argv, check=True)
def bind(src, dst, ro=False):
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    sh("mount", "--bind", src, dst)
    if ro:
        sh("mount", "-o", "remount,bind,ro", dst)
def overlay(upper, work):
    sh("mount", "-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s,workdir=%s" % (cfg["lower"], upper, work), R)
try:
    try:
        overlay(cfg["upper"], cfg["work"])
    except subprocess.CalledProcessError:
        # An overlay cannot be the upper layer of another (a host inside a
        # host): the upper layer goes to a tmpfs of this mount namespace.
        t = cfg["work"] + "-tmpfs"
        os.makedirs(t)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "upper", t)
        sh("cp", "-a", cfg["upper"], t + "/upper")
        os.makedirs(t + "/work")
        overlay(t + "/upper", t + "/work")
    sh("mount", "-t", "proc", "proc", R + "/proc")
    sh("mount", "-t", "sysfs", "sysfs", R + "/sys")
    sh("mount", "--rbind", "/sys/fs/cgroup", R + "/sys/fs/cgroup")
    sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "dev", R + "/dev")
    for dev in ("null", "zero", "full", "random", "urandom", "tty", "kvm", "net/tun", "fuse"):
        if os.path.exists("/dev/" + dev):
            bind("/dev/" + dev, R + "/dev/" + dev)
    os.makedirs(R + "/dev/pts")
    sh("mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=0620", "devpts", R + "/dev/pts")
    os.symlink("pts/ptmx", R + "/dev/ptmx")
    os.makedirs(R + "/dev/shm")
    sh("mount", "-t", "tmpfs", "-o", "mode=1777", "shm", R + "/dev/shm")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink("/proc/self/fd/%d" % i, R + "/dev/" + name)
    os.symlink("/proc/self/fd", R + "/dev/fd")
    sh("mount", "-t", "tmpfs", "-o", "mode=0755", "run", R + "/run")
    os.makedirs(R + "/run/lock")
    sh("mount", "-t", "tmpfs", "-o", "mode=1777", "tmp", R + "/tmp")
    for src, dst in cfg["persist"]:
        bind(src, R + dst)
    sh("ip", "link", "set", "lo", "up")
    socket.sethostname(cfg["hostname"])
    # The tree becomes the namespace's root (pivot_root(".", "."), then the
    # old root detached): whatever joins this mount namespace (nsenter -m,
    # also from inside the host, as tests/hostlab.py does) lands in the tree.
    libc = ctypes.CDLL(None, use_errno=True)
    os.chdir(R)
    if libc.syscall(155, b".", b".") != 0 or libc.umount2(b".", 2) != 0:  # SYS_pivot_root, MNT_DETACH
        raise OSError(ctypes.get_errno(), "pivot_root: " + os.strerror(ctypes.get_errno()))
    os.chdir("/")
except Exception as exc:
    print("error %s" % exc, flush=True)
    sys.exit(1)
print("ready", flush=True)
os.close(1)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    if signal.sigwait({signal.SIGCHLD, signal.SIGTERM}) == signal.SIGTERM:
        break
"""

CLONE_NEWNET = 0x40000000


def _setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Forwarder:
    """TCP relays: listeners in the host's network namespace, connections out from ours."""

    def __init__(self, anchor_pid, targets):
        self.listeners = []
        self.stop = threading.Event()
        ours = os.open("/proc/self/ns/net", os.O_RDONLY)
        theirs = os.open("/proc/%d/ns/net" % anchor_pid, os.O_RDONLY)
        try:
            _setns(theirs)  # sockets keep the namespace they were created in
            try:
                for i, (name, port) in enumerate(targets):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    addr = "127.0.1.%d" % (i + 1)
                    sock.bind((addr, port))
                    sock.listen(16)
                    self.listeners.append((sock, addr, name, port))
            finally:
                _setns(ours)
        finally:
            os.close(ours)
            os.close(theirs)
        for sock, _, name, port in self.listeners:
            threading.Thread(target=self._accept, args=(sock, name, port), daemon=True).start()

    def hosts_lines(self):
        return "".join("%s %s\n" % (addr, name) for _, addr, name, _ in self.listeners)

    def _accept(self, sock, name, port):
        while not self.stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(conn, name, port), daemon=True).start()

    @staticmethod
    def _relay(conn, name, port):
        try:
            out = socket.create_connection((name, port), timeout=30)
        except OSError:
            conn.close()
            return
        pair = {conn: out, out: conn}
        try:
            while pair:
                ready, _, _ = select.select(list(pair), [], [], 300)
                if not ready:
                    break
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    pair[s].sendall(data)
        except OSError:
            pass
        finally:
            conn.close()
            out.close()

    def close(self):
        self.stop.set()
        for sock, _, _, _ in self.listeners:
            sock.close()


def _ns(pid, kind):
    try:
        return os.readlink("/proc/%s/ns/%s" % (pid, kind))
    except OSError:
        return None


class Host:
    """One throwaway host on a stack's cached tree; see the module docstring."""

    def __init__(self, stack, name=None, share_pid=False, forward=False, tree="worktree", keep=False):
        self.stack = STACKS[stack] if isinstance(stack, str) else stack
        self.name = name or "fdbhook-" + self.stack.name
        self.share_pid = share_pid
        self.forward = forward
        self.tree = tree
        self.keep = keep
        self.dir = self.root = self.anchor = None
        self.token = secrets.token_hex(8)
        self._proc = self._lock = self._fwd = self._netns = None

    # --- enter / teardown ---------------------------------------------------
    def enter(self):
        lower, self._lock = image(self.stack)
        try:
            self._enter(lower)
        except BaseException:
            self.teardown()
            raise
        return self

    def _enter(self, lower):
        self.dir = tempfile.mkdtemp(prefix="fdbhook-stack-%s-" % self.stack.name, dir=WORK)
        upper, work, self.root = (os.path.join(self.dir, d) for d in ("upper", "work", "root"))
        for d in (upper, work, self.root):
            os.makedirs(d)
        with open(os.path.join(upper, MARKER), "w") as handle:
            handle.write(self.token)
        if self.tree:
            self._copy_tree(os.path.join(upper, "src"))
        if self.forward and os.path.exists(HOST_CA):
            # TLS through this workplace's egress is signed by the CA this
            # machine trusts: a fresh machine here has it, the tree does not.
            os.makedirs(os.path.join(upper, os.path.dirname(STACK_CA.lstrip("/"))), exist_ok=True)
            shutil.copyfile(HOST_CA, os.path.join(upper, STACK_CA.lstrip("/")))
        persist = []
        for path in self.stack.persist:
            src = os.path.join(CACHE, "%s-persist" % self.stack.name, path.strip("/").replace("/", "-"))
            os.makedirs(src, exist_ok=True)
            persist.append((src, path))
        cfg = {"root": self.root, "lower": lower, "upper": upper, "work": work, "persist": persist,
               "hostname": self.name}
        argv = ["unshare", "--mount", "--uts", "--ipc", "--net", "--propagation", "private"]
        if not self.share_pid:
            argv += ["--pid", "--fork"]
        argv += [sys.executable, "-I", "-c", ANCHOR, json.dumps(cfg)]
        # unshare's own complaint when teardown kills its child goes to the log.
        with open(os.path.join(self.dir, "anchor.log"), "w") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                          text=True, start_new_session=True)
        line = self._proc.stdout.readline().strip()
        if line != "ready":
            with open(os.path.join(self.dir, "anchor.log")) as log:
                raise RuntimeError("host %s did not come up: %s %s"
                                   % (self.name, line or "anchor exited", log.read()[-2000:]))
        self.anchor = self._anchor_pid()
        self._netns = _ns(self.anchor, "net")
        if self.forward:
            self._fwd = _Forwarder(self.anchor, FORWARD)
            self.run(["sh", "-c", "cat >>/etc/hosts"], input=self._fwd.hosts_lines(), cwd="/")
        say("host %s up (%s, anchor pid %d, %s pid namespace)"
            % (self.name, self.dir, self.anchor, "shared" if self.share_pid else "own"))

    def _anchor_pid(self):
        if self.share_pid:
            return self._proc.pid
        with open("/proc/%d/task/%d/children" % (self._proc.pid, self._proc.pid)) as handle:
            return int(handle.read().split()[0])

    def _copy_tree(self, dest):
        """The repository into the host: the work tree as it is, or a git revision."""
        os.makedirs(dest)
        if self.tree == "worktree":  # (no git needed: a minimal system may have none)
            subprocess.run("tar -C %s --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=build "
                           "--exclude='*.egg-info' -cf - . | tar -C %s -xf -" % (REPO, dest), shell=True, check=True)
        else:
            subprocess.run("git -C %s archive %s | tar -C %s -xf -" % (REPO, self.tree, dest), shell=True,
                           check=True)

    def processes(self):
        """PIDs (in our PID namespace) of every process of this host: its root is the
        host's tree, or it is in the host's network namespace (a chroot of its own
        inside), or it descends from one of those (a container started inside)."""
        ours, parent = set(), {}
        netns = self._netns
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    parent[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
                if netns is not None and _ns(entry, "net") == netns:
                    ours.add(int(entry))
                    continue
                with open("/proc/%s/root/%s" % (entry, MARKER)) as handle:
                    if handle.read() == self.token:
                        ours.add(int(entry))
            except (OSError, ValueError, IndexError):
                pass
        def inside(pid, seen=0):
            while pid > 1 and seen < 64:
                if pid in ours:
                    return True
                pid, seen = parent.get(pid, 0), seen + 1
            return False
        return sorted(pid for pid in parent if inside(pid))

    def teardown(self):
        """Kill what runs in the host, let its namespaces go, delete its directory."""
        if self._fwd:
            self._fwd.close()
            self._fwd = None
        if self._proc is not None:
            deadline = time.monotonic() + 30
            first = True
            while True:
                victims = self.processes()
                if first and self._proc.poll() is None:
                    # Only while it cannot have been reaped (no pid reuse): the
                    # anchor (PID 1 of its namespace: all of it dies), or
                    # unshare itself if the anchor never said who it is.
                    victims.append(self.anchor or self._proc.pid)
                first = False
                for pid in victims:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    self._proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass
                if self._proc.poll() is not None and not self.processes():
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("host %s: processes %s did not die" % (self.name, self.processes()))
            self._proc.stdout.close()
            self._proc = None
        if self.dir and not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.dir:
            say("kept %s (its upper layer holds what the host wrote)" % self.dir)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self):
        return self.enter()

    def __exit__(self, *exc):
        self.teardown()

    # --- running commands ------------------------------------------------------
    def command(self, argv, cwd="/src", env=None):
        """The argv that runs ARGV inside the host (as root, in CWD, clean environment)."""
        base = {"PATH": SERVICE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "dumb")}
        base.update({k: v for k, v in os.environ.items() if k.startswith("FDBHOOK_") or k == "CI"})
        if self.forward:
            base.update(PIP_CERT=STACK_CA, SSL_CERT_FILE=STACK_CA)
        base.update(env or {})
        ns = ["nsenter", "--target", str(self.anchor), "--mount", "--uts", "--ipc", "--net"]
        if not self.share_pid:
            ns.append("--pid")
        return ns + ["--", "/usr/bin/env", "-i"] + ["%s=%s" % kv for kv in sorted(base.items())] \
            + ["/bin/sh", "-c", 'cd "$0" && exec "$@"', cwd] + list(argv)

    def run(self, argv, cwd="/src", env=None, check=True, **kwargs):
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv, cwd, env), check=check, **kwargs)


def enter(stack, **kwargs):
    """A host on STACK, up; pair with teardown()."""
    return Host(stack, **kwargs).enter()


def teardown(host):
    host.teardown()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m tests.stacks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the cached tree of a stack")
    b.add_argument("stack", choices=sorted(STACKS))
    r = sub.add_parser("run", help="enter a host, run a command in /src, tear down")
    r.add_argument("stack", choices=sorted(STACKS))
    r.add_argument("--share-pid", action="store_true", help="stay in the machine's PID namespace")
    r.add_argument("--forward", action="store_true", help="relay %s" % ", ".join(n for n, _ in FORWARD))
    r.add_argument("--tree", default="worktree", help="worktree (default) or a git revision to copy to /src")
    r.add_argument("--keep", action="store_true", help="keep the host's directory afterwards")
    r.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        t0 = time.monotonic()
        root, fd = image(STACKS[args.stack])
        os.close(fd)
        print("%s (%.0f s)" % (root, time.monotonic() - t0))
        return 0
    host = Host(args.stack, share_pid=args.share_pid, forward=args.forward, tree=args.tree, keep=args.keep)
    # A signal must still tear the host down.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *a: sys.exit(129))
    with host:
        return host.run(args.command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
