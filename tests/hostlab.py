"""Two virtualization "hosts" on one machine, for live migration tests and the migration bench.

A host is a set of namespaces this module owns:

* a network namespace (``fxd-a`` / ``fxd-b``) with the managed bridge
  ``fxd-br``, the unmanaged bridge ``fxd-um`` and one uplink veth for each;
* a mount and UTS namespace, held open by a ``sleep`` process started through
  ``ip netns exec`` (so /sys shows the host's own devices), in which the host's
  own directories are bound over ``/run``, ``/etc/libvirt``, ``/var/lib/libvirt``,
  ``/var/cache/libvirt``, ``/var/log/libvirt``, ``/etc/fdbhook`` and
  ``/opt/fdbhook``; its host name is ``fxd-a`` / ``fxd-b``;
* in it: fdbhook installed by ``install.sh`` (its default paths, which inside
  the host are the host's own), fdbhookd (optional) and libvirtd with its own
  ``host_uuid`` and ``cgroup_controllers = [ ]``.

The "wire" is a third network namespace ``fxd-w``: a learning bridge ``fxd-sw``
(the physical switch) joining the hosts' uplinks by veth pairs, plus a probe
port ``fxd-p`` where the tests send and receive raw 0x88B5 frames.

Everything lives under ``/tmp/fxd-lab`` (one directory both hosts see: the
migration sockets go there); only the fdbhook virtualenv is kept across runs
in ``/var/cache/fxd-lab`` (install.sh rebuilds it when the source changed).
Nothing touches the machine's own libvirtd, ``/etc/fdbhook`` or ``/opt/fdbhook``:
those paths are only mount points inside the hosts' mount namespaces.

Kernel state is read per host with ``ip -n NS`` / ``bridge -n NS`` (iproute2's
own setns), independently of fdbhook's code. Every process started here is
recorded with its start time in ``/tmp/fxd-lab/pids``; a later run kills
leftovers of a killed run by exactly those pids.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

from fdbhook.lab import in_netns, poll
from fdbhook.txn import process_start
from tests.helpers import stop_process, unit_nice

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "/tmp/fxd-lab"
CACHE = "/var/cache/fxd-lab"
VENV_CACHE = os.path.join(CACHE, "opt-fdbhook")
PIDS = os.path.join(BASE, "pids")
MIG_DIR = os.path.join(BASE, "mig")
LAST_LOGS = "/tmp/fxd-lab-last"  # the hosts' logs, kept after close
WIRE_NS = "fxd-w"
SWITCH = "fxd-sw"
PROBE = "fxd-p"  # the probe port's far end, in WIRE_NS
BRIDGE = "fxd-br"  # managed on both hosts
UNMANAGED = "fxd-um"  # not managed (baseline)
PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "qemu-system-x86")
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bound over the real paths inside a host (created under the host's own tree).
PRIVATE_DIRS = ("run", "etc/libvirt", "var/lib/libvirt", "var/cache/libvirt", "var/log/libvirt", "etc/fdbhook")

LIBVIRTD_CONF = """\
# fxd host lab
host_uuid = "{uuid}"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
QEMU_CONF = """\
# fxd host lab: two libvirtd on one kernel must not share cgroups or a security driver
user = "root"
group = "root"
cgroup_controllers = [ ]
security_driver = "none"
namespaces = [ ]
stdio_handler = "file"
"""


class HostLabError(RuntimeError):
    pass


def run(argv, check=True, timeout=120, env=None, input=None):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          env=env, input=input)
    if check and proc.returncode != 0:
        raise HostLabError("%s: exit %d\nstdout: %s\nstderr: %s"
                           % (" ".join(map(str, argv)), proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:]))
    return proc


def ns_json(tool, ns, *args):
    """``ip|bridge -n NS -j ARGS`` parsed ([] for no output, None if the command failed)."""
    proc = run([tool, "-n", ns, "-j", *args], check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout) if proc.stdout.strip() else []


# --- process bookkeeping (exact pids, never names) ------------------------------------

def _start_time(pid):
    start = process_start(pid)
    return None if start is None else str(start)


def _remember(pid):
    os.makedirs(BASE, exist_ok=True)
    with open(PIDS, "a") as handle:
        handle.write("%d %s\n" % (pid, _start_time(pid)))


def _kill_exact(pid, start, sig=signal.SIGKILL):
    """Signal PID only if it is still the process we started (same start time)."""
    if start is not None and _start_time(pid) == start:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_qemus(root):
    """QEMU processes a host's libvirtd left (pid files under its own /run)."""
    qdir = os.path.join(root, "run", "libvirt", "qemu")
    for name in os.listdir(qdir) if os.path.isdir(qdir) else ():
        if name.endswith(".pid"):
            try:
                with open(os.path.join(qdir, name)) as handle:
                    pid = int(handle.read().strip())
            except (OSError, ValueError):
                continue
            # the pid file's QEMU: its mount namespace is one of ours (exe check keeps it exact)
            try:
                if "qemu-system" in os.readlink("/proc/%d/exe" % pid):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def cleanup_leftovers():
    """Whatever a killed earlier run left: its processes (by recorded pid), namespaces, files."""
    for host in ("a", "b"):
        _kill_qemus(os.path.join(BASE, host))
    if os.path.exists(PIDS):
        with open(PIDS) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit():
                    _kill_exact(int(parts[0]), parts[1])
        os.unlink(PIDS)
    for ns in ("fxd-a", "fxd-b", WIRE_NS):
        if os.path.exists("/run/netns/" + ns):
            run(["ip", "netns", "del", ns], check=False)
    if os.path.isdir(BASE):
        shutil.rmtree(BASE, ignore_errors=True)


# --- set-up steps ---------------------------------------------------------------------------

def ensure_packages():
    """Debian 12's libvirt 9.0 + QEMU (what tests/system/libvirtd-up.sh installs too)."""
    def missing():
        out = []
        for pkg in PACKAGES:
            proc = run(["dpkg-query", "-W", "-f=${Status}", pkg], check=False)
            if "install ok installed" not in proc.stdout:
                out.append(pkg)
        return out

    need = missing()
    if need:
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "install", "-y", "-q", "--no-install-recommends"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if run(apt + need, check=False, timeout=1800, env=env).returncode != 0:
            run(["apt-get", "-o", "DPkg::Lock::Timeout=900", "update", "-q"], timeout=900, env=env)
            run(apt + need, timeout=1800, env=env)
    # Debian's qemu driver resolves group libvirt-qemu at start even with group = "root"
    if run(["getent", "group", "libvirt-qemu"], check=False).returncode != 0:
        run(["groupadd", "--system", "libvirt-qemu"])
    for path in ("/etc/fdbhook", "/opt/fdbhook"):  # mount points only; never written here
        os.makedirs(path, exist_ok=True)


def _veth(a, ns_a, b, ns_b):
    run(["ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b])


def _netns(name):
    run(["ip", "netns", "add", name])
    with in_netns(name):
        for conf in ("default", "all"):  # no ND/MLD of the kernel's own on the wire
            with open("/proc/sys/net/ipv6/conf/%s/disable_ipv6" % conf, "w") as handle:
                handle.write("1")
    run(["ip", "-n", name, "link", "set", "lo", "up"])


class Host:
    """One libvirt host: its namespaces, its tree under /tmp/fxd-lab/NAME, its daemons."""

    def __init__(self, name):
        self.name = name  # "a" | "b"
        self.ns = "fxd-" + name
        self.hostname = "fxd-" + name
        self.root = os.path.join(BASE, name)
        self.uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, "fxd-lab-host-" + name))
        self.holder = None
        self.libvirtd = None
        self.fdbhookd = None

    # --- paths as seen from outside (the tree behind the bind mounts) ------------------------
    def path(self, inside):
        """The outside path of INSIDE (an absolute path under one of the private dirs)."""
        rel = inside.lstrip("/")
        for d in PRIVATE_DIRS:
            if rel == d or rel.startswith(d + "/"):
                return os.path.join(self.root, rel)
        raise ValueError("%s is not private to host %s" % (inside, self.name))

    @property
    def socket(self):
        return self.path("/run/libvirt/libvirt-sock")

    @property
    def uri(self):
        """Reaches this host's libvirtd from anywhere on the machine (no IP)."""
        return "qemu+unix:///system?socket=" + self.socket

    @property
    def hook_log(self):
        return self.path("/var/log/libvirt/fdbhook-hooks.log")

    def record_dir(self):
        return self.path("/run/fdbhook/domains")

    def records(self):
        try:
            return sorted(os.listdir(self.record_dir()))
        except FileNotFoundError:
            return []

    # --- namespaces ------------------------------------------------------------------------
    def enter(self, argv):
        """ARGV run inside this host (mount, UTS and network namespace)."""
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-u", "-n", "--", *argv]

    def run(self, argv, **kw):
        return run(self.enter(argv), **kw)

    def service_env(self, **extra):
        env = {"PATH": SERVICE_PATH, "HOME": "/root", "LC_ALL": "C", "FDBHOOK_LOG": "/var/log/libvirt/fdbhook-hooks.log"}
        env.update(extra)
        return ["env", "-i"] + ["%s=%s" % kv for kv in env.items()]

    def make_tree(self):
        for d in PRIVATE_DIRS:
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        etc = os.path.join(self.root, "etc", "libvirt")
        with open(os.path.join(etc, "libvirtd.conf"), "w") as handle:
            handle.write(LIBVIRTD_CONF.format(uuid=self.uuid))
        with open(os.path.join(etc, "qemu.conf"), "w") as handle:
            handle.write(QEMU_CONF)

    def start_holder(self):
        ready = os.path.join(BASE, "%s.ready" % self.name)
        mounts = " && ".join("mount --bind %s/%s /%s" % (self.root, d, d) for d in PRIVATE_DIRS)
        script = ("set -e; %s && mount --bind %s /opt/fdbhook && hostname %s && touch %s && exec sleep infinity"
                  % (mounts, VENV_CACHE, self.hostname, ready))
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _remember(self.holder.pid)
        if not poll(lambda: os.path.exists(ready) or self.holder.poll() is not None, timeout=20):
            raise HostLabError("host %s: mount namespace not ready" % self.name)
        if self.holder.poll() is not None:
            raise HostLabError("host %s: mount namespace set-up failed: %s"
                               % (self.name, self.holder.stderr.read().decode(errors="replace")))

    def install_fdbhook(self, bridges=BRIDGE):
        """install.sh inside the host: venv at (the host's) /opt/fdbhook, hooks in its /etc/libvirt/hooks."""
        return self.run(self.service_env() + [
            os.path.join(REPO, "install.sh"), "--venv", "--no-apt", "--no-demo", "--bridges", bridges,
            "--bindir", "/var/lib/libvirt/fdbhook-bin"], timeout=900)

    def start_fdbhookd(self):
        if self.fdbhookd is not None:
            return
        log = open(os.path.join(self.root, "var", "log", "libvirt", "fdbhookd.log"), "ab")
        self.fdbhookd = subprocess.Popen(
            self.enter(self.service_env() + ["nice", "-n", str(unit_nice()),  # as the unit starts it
                                             "/opt/fdbhook/bin/fdbhook", "-v", "daemon", "--uri", "qemu:///system"]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _remember(self.fdbhookd.pid)
        sock = self.path("/run/fdbhook/fdbhookd.sock")
        if not poll(lambda: os.path.exists(sock) or self.fdbhookd.poll() is not None, timeout=30):
            raise HostLabError("host %s: fdbhookd socket %s did not appear" % (self.name, sock))
        if self.fdbhookd.poll() is not None:
            raise HostLabError("host %s: fdbhookd exited: %s" % (self.name, self.tail("fdbhookd.log")))

    def stop_fdbhookd(self):
        proc, self.fdbhookd = self.fdbhookd, None
        if proc is None:
            return
        stop_process(proc, timeout=15)

    def daemon_watching(self):
        """fdbhookd has connected to this host's libvirtd (its log says so)."""
        return "libvirt qemu:///system: connected" in self.tail("fdbhookd.log", 200000)

    def start_libvirtd(self):
        log = open(os.path.join(self.root, "var", "log", "libvirt", "libvirtd.stdout"), "ab")
        self.libvirtd = subprocess.Popen(self.enter(self.service_env() + ["libvirtd"]),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _remember(self.libvirtd.pid)

        def answers():
            if self.libvirtd.poll() is not None:
                raise HostLabError("host %s: libvirtd exited: %s" % (self.name, self.tail("libvirtd.log")))
            return self.virsh("uri", check=False, timeout=10).returncode == 0

        if not poll(answers, timeout=60, interval=0.2):
            raise HostLabError("host %s: libvirtd does not answer on %s" % (self.name, self.socket))
        hostname = self.virsh("hostname").stdout.strip()
        if hostname != self.hostname:
            raise HostLabError("host %s: libvirtd reports host name %r" % (self.name, hostname))

    def stop_libvirtd(self):
        proc, self.libvirtd = self.libvirtd, None
        if proc is None:
            return
        for name in self.domains():
            self.virsh("destroy", name, check=False, timeout=60)
        stop_process(proc, timeout=30)

    def stop(self):
        for step in (self.stop_libvirtd, self.stop_fdbhookd):
            try:
                step()
            except Exception:  # cleanup goes on
                pass
        _kill_qemus(self.root)
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(timeout=15)
            self.holder = None

    def tail(self, logname, size=3000):
        try:
            with open(os.path.join(self.root, "var", "log", "libvirt", logname), "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - size))
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    # --- libvirt ---------------------------------------------------------------------------
    def virsh(self, *args, check=True, timeout=120):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FDBHOOK_")}
        env["LC_ALL"] = "C"
        return run(["virsh", "-q", "-c", self.uri, *args], check=check, timeout=timeout, env=env)

    def domains(self):
        proc = self.virsh("list", "--name", check=False, timeout=30)
        return [n for n in proc.stdout.split() if n] if proc.returncode == 0 else []

    def state(self, name):
        proc = self.virsh("domstate", name, check=False, timeout=30)
        return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None

    def create(self, xml):
        with tempfile.NamedTemporaryFile("w", suffix=".xml", dir=BASE, delete=False) as handle:
            handle.write(xml)
        try:
            return self.virsh("create", handle.name, timeout=180)
        finally:
            os.unlink(handle.name)

    # --- kernel state, read with iproute2 inside this host's netns --------------------------
    def fdb(self, bridge=BRIDGE):
        return ns_json("bridge", self.ns, "fdb", "show", "br", bridge) or []

    def static_entries(self, mac, bridge=BRIDGE):
        """Static master entries for MAC on the bridge's ports (not the bridge's own)."""
        return [e for e in self.fdb(bridge) if e.get("mac") == mac.lower() and e.get("state") == "static"
                and e.get("master") == bridge and e.get("ifname") != bridge]

    def port(self, dev):
        """{master, learning, flood, locked} of DEV, or None if DEV is absent."""
        links = ns_json("ip", self.ns, "-d", "link", "show", "dev", dev)
        if not links:
            return None
        slave = links[0].get("linkinfo", {}).get("info_slave_data", {})
        return {"ifindex": links[0]["ifindex"], "master": links[0].get("master"),
                "learning": slave.get("learning"), "flood": slave.get("flood"), "locked": slave.get("locked")}

    def ports(self, bridge=BRIDGE):
        links = ns_json("ip", self.ns, "-d", "link", "show", "master", bridge) or []
        return {l["ifname"]: l.get("linkinfo", {}).get("info_slave_data", {}) for l in links if "ifname" in l}


class TwoHosts:
    """Hosts A and B, the wire, fdbhook on both; a context manager that always cleans up.

    ``daemons`` says on which hosts fdbhookd runs at start (a test may stop or
    start one later with ``host.stop_fdbhookd()`` / ``host.start_fdbhookd()``).
    """

    def __init__(self, daemons=("a", "b")):
        self.a = Host("a")
        self.b = Host("b")
        self.daemons = daemons
        self.timings = {}

    @property
    def hosts(self):
        return (self.a, self.b)

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        t0 = time.monotonic()
        if os.geteuid() != 0:
            raise HostLabError("the host lab needs root")
        ensure_packages()
        cleanup_leftovers()
        os.makedirs(MIG_DIR, exist_ok=True)
        os.makedirs(VENV_CACHE, exist_ok=True)
        self._network()
        t1 = time.monotonic()
        for host in self.hosts:
            host.make_tree()
            host.start_holder()
            host.install_fdbhook()
        t2 = time.monotonic()
        for host in self.hosts:
            if host.name in self.daemons:
                host.start_fdbhookd()  # before libvirtd, as README says
            host.start_libvirtd()
        for host in self.hosts:
            if host.fdbhookd is not None and not poll(host.daemon_watching, timeout=30, interval=0.1):
                raise HostLabError("host %s: fdbhookd did not connect to libvirtd: %s"
                                   % (host.name, host.tail("fdbhookd.log")))
        self.timings = {"network_s": t1 - t0, "install_s": t2 - t1, "daemons_s": time.monotonic() - t2}
        return self

    def _network(self):
        for ns in (WIRE_NS, self.a.ns, self.b.ns):
            _netns(ns)
        run(["ip", "-n", WIRE_NS, "link", "add", SWITCH, "type", "bridge"])
        _veth("fxd-wp", WIRE_NS, PROBE, WIRE_NS)
        ports = ["fxd-wp"]
        for host in self.hosts:
            for bridge, uplink, peer in ((BRIDGE, "fxd-up", "fxd-w" + host.name),
                                         (UNMANAGED, "fxd-upu", "fxd-w%su" % host.name)):
                run(["ip", "-n", host.ns, "link", "add", bridge, "type", "bridge"])
                _veth(uplink, host.ns, peer, WIRE_NS)
                run(["ip", "-n", host.ns, "link", "set", uplink, "master", bridge])
                run(["ip", "-n", host.ns, "link", "set", uplink, "up"])
                run(["ip", "-n", host.ns, "link", "set", bridge, "up"])
                ports.append(peer)
        for port in ports:
            run(["ip", "-n", WIRE_NS, "link", "set", port, "master", SWITCH])
            run(["ip", "-n", WIRE_NS, "link", "set", port, "up"])
        run(["ip", "-n", WIRE_NS, "link", "set", PROBE, "up"])
        run(["ip", "-n", WIRE_NS, "link", "set", SWITCH, "up"])

    def close(self):
        for host in self.hosts:
            host.stop()
        # the hosts' logs survive the lab, for a post-mortem of the last run
        shutil.rmtree(LAST_LOGS, ignore_errors=True)
        for host in self.hosts:
            logs = os.path.join(host.root, "var", "log", "libvirt")
            if os.path.isdir(logs):
                shutil.copytree(logs, os.path.join(LAST_LOGS, host.name), ignore_dangling_symlinks=True,
                                dirs_exist_ok=True)
        for ns in (self.a.ns, self.b.ns, WIRE_NS):
            if os.path.exists("/run/netns/" + ns):
                run(["ip", "netns", "del", ns], check=False)
        if os.path.exists(PIDS):
            os.unlink(PIDS)
        shutil.rmtree(BASE, ignore_errors=True)

    # --- migration -------------------------------------------------------------------------
    def other(self, host):
        return self.b if host is self.a else self.a

    def migrate(self, name, src, dst, check=True, timeout=300, extra=()):
        """``virsh migrate --live`` from SRC to DST over UNIX sockets (no IP anywhere)."""
        sock = os.path.join(MIG_DIR, "%s-%s.sock" % (name, dst.name))
        return src.virsh("migrate", "--live", *extra, name, dst.uri, "--migrateuri", "unix://" + sock,
                         check=check, timeout=timeout)


@contextlib.contextmanager
def two_hosts(daemons=("a", "b")):
    with TwoHosts(daemons) as lab:
        yield lab


# --- guests -----------------------------------------------------------------------------------

def diskless_xml(name, mac, bridge=BRIDGE, tap="fxd-t1"):
    """A 64 MiB diskless QEMU guest (no OS) with one virtio NIC; tap name fixed on both hosts."""
    return ("<domain type='qemu'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
            "<on_poweroff>destroy</on_poweroff><devices>"
            "<interface type='bridge'><mac address='%s'/><source bridge='%s'/><target dev='%s'/>"
            "<model type='virtio'/><rom enabled='no'/></interface>"
            "</devices></domain>" % (name, mac, bridge, tap))


# --- a real guest OS (tests/guestos.py: Debian kernel + busybox initramfs, answers PING with PONG) ---

def guest_image():
    """guestos.image(), copied into the lab (a rebuild of the shared cache must not pull the kernel
    file from under a guest that migrates: the destination opens it again)."""
    from tests import guestos

    img = guestos.image()
    out = os.path.join(BASE, "image")
    if not os.path.exists(os.path.join(out, "initrd.gz")):
        os.makedirs(out, exist_ok=True)
        shutil.copyfile(img.kernel, os.path.join(out, "vmlinuz"))
        shutil.copyfile(img.initrd, os.path.join(out, "initrd.gz.tmp"))
        os.rename(os.path.join(out, "initrd.gz.tmp"), os.path.join(out, "initrd.gz"))
    return guestos.Image(kernel=os.path.join(out, "vmlinuz"), initrd=os.path.join(out, "initrd.gz"),
                         cmdline=img.cmdline)


def os_guest_xml(name, mac, bridge=BRIDGE, tap="fxd-t1", memory_mib=128):
    """The guestos guest with one NIC; its console log and control socket are host-private paths
    (the same inside path on both hosts, so the migrated XML works on either)."""
    from tests import guestos

    nic = guestos.nic_xml(mac, bridge=bridge).replace("<model", "<target dev='%s'/><model" % tap, 1)
    return guestos.domain_xml(name, [nic], console_log="/var/log/libvirt/%s.console" % name,
                              control_sock="/var/lib/libvirt/%s.ctl" % name, img=guest_image(),
                              memory_mib=memory_mib)


def guest_control(host, name):
    """guestos.Control for NAME running on HOST (reconnect after every migration)."""
    from tests import guestos

    return guestos.Control(host.path("/var/lib/libvirt/%s.ctl" % name))


# --- what happened, when: kernel samples, libvirt events, frames ----------------------------------

class Timeline:
    """Samples both hosts' bridge (``bridge -j fdb``, ``ip -d -j link``) as fast as they answer.

    ``samples[host_name]``: list of (t, {port: entry flags} for MAC's static entries,
    {port: (learning, flood)}), t = wall-clock midpoint of the two reads.
    """

    def __init__(self, lab, mac, bridge=BRIDGE, pause=0.005):
        import threading

        self.pause = pause  # between samples: leave the 2 cores to the guests

        self.lab, self.mac, self.bridge = lab, mac.lower(), bridge
        self.samples = {h.name: [] for h in lab.hosts}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(h,), daemon=True) for h in lab.hosts]

    def _loop(self, host):
        while not self._stop.is_set():
            t0 = time.time()
            fdb = ns_json("bridge", host.ns, "fdb", "show", "br", self.bridge) or []
            links = ns_json("ip", host.ns, "-d", "link", "show", "master", self.bridge) or []
            t1 = time.time()
            entries = {e["ifname"]: e.get("flags", []) for e in fdb
                       if e.get("mac") == self.mac and e.get("state") == "static"
                       and e.get("master") == self.bridge and e.get("ifname") != self.bridge}
            ports = {}
            for link in links:
                slave = link.get("linkinfo", {}).get("info_slave_data", {})
                ports[link["ifname"]] = (slave.get("learning"), slave.get("flood"))
            self.samples[host.name].append(((t0 + t1) / 2, entries, ports))
            self._stop.wait(self.pause)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        return False

    def first(self, host, predicate):
        """Time of the first sample on HOST for which predicate(entries, ports) holds, or None."""
        for t, entries, ports in self.samples[host]:
            if predicate(entries, ports):
                return t
        return None

    def overlaps(self, uplinks=("fxd-up", "fxd-upu")):
        """Moments (t on A, t on B) at which both hosts held MAC as a static entry on a guest port."""
        def held(entries):
            return any(p not in uplinks for p in entries)

        out = []
        a, b = self.samples["a"], self.samples["b"]
        j = 0
        for t, entries, _ in a:
            # the B sample nearest in time
            while j + 1 < len(b) and abs(b[j + 1][0] - t) <= abs(b[j][0] - t):
                j += 1
            if b and held(entries) and held(b[j][1]):
                out.append((t, b[j][0]))
        return out


class Events:
    """``virsh event --loop --timestamp`` on one host: [(wall time, domain, event, detail)]."""

    def __init__(self, host):
        self.host = host
        self.proc = None
        self.events = []

    def __enter__(self):
        env = dict((k, v) for k, v in os.environ.items() if not k.startswith("FDBHOOK_"))
        env["LC_ALL"] = "C"
        self.proc = subprocess.Popen(["virsh", "-q", "-c", self.host.uri, "event", "--all", "--loop", "--timestamp"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        _remember(self.proc.pid)
        time.sleep(0.3)  # virsh registers its callbacks before anything we do next
        return self

    def __exit__(self, *exc):
        time.sleep(0.2)
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            # 2026-12-01 20:00:00.123+0000: event 'lifecycle' for domain 'g1': Resumed Migrated
            stamp, _, rest = line.partition(": event '")
            if not rest:
                continue
            kind, _, rest = rest.partition("'")
            dom = rest.split("'")[1] if "'" in rest else ""
            detail = rest.rsplit(": ", 1)[-1].strip()
            self.events.append((_parse_stamp(stamp), dom, kind, detail))
        return False

    def when(self, detail_prefix, domain=None):
        """Wall time of the first lifecycle event whose detail starts with DETAIL_PREFIX."""
        for t, dom, kind, detail in self.events:
            if kind == "lifecycle" and detail.startswith(detail_prefix) and (domain is None or dom == domain):
                return t
        return None


def _parse_stamp(stamp):
    import datetime

    return datetime.datetime.strptime(stamp.strip(), "%Y-%m-%d %H:%M:%S.%f%z").timestamp()


class FdbMonitor:
    """``bridge -timestamp monitor fdb`` on one host: [(wall time, 'add'|'del', port)] for MAC's static
    entries on BRIDGE's ports (times as the monitor received the kernel's notifications; both hosts'
    monitors run on this machine's one clock, so they order the two kernels' changes to a ms or so)."""

    def __init__(self, host, mac, bridge=BRIDGE):
        self.host, self.mac, self.bridge = host, mac.lower(), bridge
        self.proc = None
        self.events = []

    def __enter__(self):
        self.proc = subprocess.Popen(["bridge", "-n", self.host.ns, "-timestamp", "monitor", "fdb"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        _remember(self.proc.pid)
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        time.sleep(0.1)
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        self.events = self.parse(out, self.mac, self.bridge)
        return False

    @staticmethod
    def parse(out, mac, bridge):
        import datetime

        events, stamp = [], None
        for line in out.splitlines():
            if line.startswith("Timestamp: "):
                # Timestamp: Mon Dec  7 11:26:09 2026 258379 usec
                words = line.split()
                when = datetime.datetime.strptime(" ".join(words[1:6]), "%a %b %d %H:%M:%S %Y")
                stamp = time.mktime(when.timetuple()) + int(words[6]) / 1e6
                continue
            words = line.split()
            deleted = words[:1] == ["Deleted"]
            words = words[1:] if deleted else words
            if stamp is None or not words or words[0] != mac or "static" not in words \
                    or "dev" not in words or "master" not in words:
                continue
            port = words[words.index("dev") + 1]
            if words[words.index("master") + 1] == bridge and port != bridge:
                events.append((stamp, "del" if deleted else "add", port))
        return events

    def first(self, kind, skip=()):
        """Time of the first KIND event on a port not in SKIP, or None."""
        return next((t for t, k, port in self.events if k == kind and port not in skip), None)


def handover(obs, uplinks=("fxd-up", "fxd-upu")):
    """{src_del, dst_add (wall times), both_ms: dst_add - src_del < 0 means both hosts held the MAC}."""
    src_del = obs.src_fdb.first("del", uplinks)
    dst_add = obs.dst_fdb.first("add", uplinks)
    out = {"src_del": src_del, "dst_add": dst_add}
    if src_del is not None and dst_add is not None:
        out["dst_add_after_src_del_ms"] = round((dst_add - src_del) * 1000.0, 1)
    return out


PROBE_MAC = "02:fd:00:00:00:99"
PACKET_OUTGOING = 4


class Traffic:
    """PING frames to the guest's MAC from the probe port every ``interval`` s, PONGs seen on the wire.

    * ``sent[seq]``: send time;
    * ``pongs[seq]``: (time, switch port it came in on: fxd-wa/fxd-wb/fxd-wau/fxd-wbu) - the guest
      answered, so a running guest received it on that host;
    * ``delivered[host]``: [(time, seq, port)] PINGs the host's bridge sent to a guest port
      (``fxd-t*``), whether or not a running guest read them.
    """

    def __init__(self, lab, mac, interval=0.004, tap_prefix="fxd-t"):
        import threading

        self.lab, self.mac, self.interval, self.tap_prefix = lab, mac.lower(), interval, tap_prefix
        self.tag = os.urandom(4)
        self.sent, self.pongs = {}, {}
        self.delivered = {h.name: [] for h in lab.hosts}
        self._stop = threading.Event()
        self._sending = True
        self._threads = []

    def _socket(self, ns, bind=None):
        import socket

        with in_netns(ns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            if bind:
                sock.bind((bind, 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.settimeout(0.2)
        return sock

    def _seq(self, payload, word):
        import struct

        if payload[:5] != word + b" " or payload[9:13] != self.tag:
            return None
        return struct.unpack("!I", payload[5:9])[0]

    def _sender(self, sock):
        import struct

        from fdbhook.lab import make_frame

        seq, t0 = 0, time.monotonic()
        while self._sending:
            seq += 1
            frame = make_frame(self.mac, PROBE_MAC, b"PING " + struct.pack("!I", seq) + self.tag)
            self.sent[seq] = time.time()
            sock.send(frame)
            delay = t0 + seq * self.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def _wire(self, sock):
        while not self._stop.is_set():
            try:
                data, addr = sock.recvfrom(2048)
            except OSError:
                continue
            if addr[2] == PACKET_OUTGOING or data[12:14] != b"\x88\xb5" or not addr[0].startswith("fxd-w"):
                continue
            seq = self._seq(data[14:], b"PONG")
            if seq is not None and seq not in self.pongs:
                self.pongs[seq] = (time.time(), addr[0])

    def _host(self, sock, name):
        while not self._stop.is_set():
            try:
                data, addr = sock.recvfrom(2048)
            except OSError:
                continue
            if addr[2] != PACKET_OUTGOING or not addr[0].startswith(self.tap_prefix) or data[12:14] != b"\x88\xb5":
                continue
            seq = self._seq(data[14:], b"PING")
            if seq is not None:
                self.delivered[name].append((time.time(), seq, addr[0]))

    def __enter__(self):
        import threading

        run(["ip", "-n", WIRE_NS, "link", "set", PROBE, "address", PROBE_MAC])
        jobs = [(self._sender, self._socket(WIRE_NS, PROBE)), (self._wire, self._socket(WIRE_NS))]
        jobs += [(self._host, self._socket(h.ns), h.name) for h in self.lab.hosts]
        for target, *args in jobs:
            self._threads.append(threading.Thread(target=target, args=args, daemon=True))
        self._socks = [args[0] for _, *args in jobs]
        for thread in self._threads[1:]:
            thread.start()
        self._threads[0].start()
        return self

    def __exit__(self, *exc):
        self._sending = False
        self._threads[0].join(timeout=10)
        time.sleep(0.3)  # the last answers
        self._stop.set()
        for thread in self._threads[1:]:
            thread.join(timeout=10)
        for sock in self._socks:
            sock.close()
        return False

    def via(self, seq):
        """'a'/'b' for the host whose guest answered SEQ, or None."""
        pong = self.pongs.get(seq)
        return pong[1][len("fxd-w")] if pong else None

    def runs_lost(self):
        """[(first seq, last seq)] of consecutive PINGs nobody answered."""
        out, run_start = [], None
        for seq in sorted(self.sent):
            if seq not in self.pongs:
                run_start = seq if run_start is None else run_start
            elif run_start is not None:
                out.append((run_start, seq - 1))
                run_start = None
        if run_start is not None:
            out.append((run_start, max(self.sent)))
        return out

    def summary(self, t_resumed=None):
        """Counts over the run and the unicast gap of the move from one host to the other.

        gap_ms: the stretch of sent PINGs none of which was answered (send time of the answered
        PING after it minus that of the one before it) around the resume, else the longest:
        the outage a sender sees.
        stale_after_resume: PINGs the old host's bridge still delivered to a guest port after
        the guest resumed on the new host (T_RESUMED, wall clock).
        """
        seqs = sorted(self.sent)
        answered = [s for s in seqs if s in self.pongs]
        out = {"sent": len(seqs), "answered": len(answered), "lost": len(seqs) - len(answered)}
        if len(answered) < 2:
            return out
        old, new = self.via(answered[0]), self.via(answered[-1])
        out["from"], out["to"] = old, new
        out["lost_runs"] = len(self.runs_lost())
        if t_resumed is not None and old is not None:
            out["stale_after_resume"] = sum(1 for t, _, _ in self.delivered[old] if t > t_resumed)
        # only stretches with lost PINGs (a sender that was not scheduled for a while lost nothing);
        # the one around the resume if there is one (a busy guest drops a few frames of its own)
        gaps = [(self.sent[b] - self.sent[a], a, b) for a, b in zip(answered, answered[1:]) if b - a > 1]
        around = [g for g in gaps if t_resumed is not None and self.sent[g[1]] <= t_resumed <= self.sent[g[2]]]
        if not gaps:
            out.update(gap_ms=0.0, lost_in_gap=0)
            return out
        gap, a, b = max(around or gaps)
        out["gap_ms"] = round(gap * 1000.0, 1)
        out["lost_in_gap"] = b - a - 1
        if t_resumed is not None:
            # > 0: PINGs sent after the resume still went unanswered for that long
            out["resume_to_answered_ms"] = round((self.sent[b] - t_resumed) * 1000.0, 1)
        return out
        gap, a, b = max(gaps)
        out["gap_ms"] = round(gap * 1000.0, 1)
        out["lost_in_gap"] = b - a - 1
        if t_resumed is not None:
            # > 0: PINGs sent after the resume still went unanswered for that long
            out["resume_to_answered_ms"] = round((self.sent[b] - t_resumed) * 1000.0, 1)
        out["lost_runs"] = len(self.runs_lost())
        if t_resumed is not None and old is not None:
            out["stale_after_resume"] = sum(1 for t, _, _ in self.delivered[old] if t > t_resumed)
        return out


class Observed:
    """One migration with everything watched: ``result`` (virsh), ``timeline``, ``traffic``,
    ``src_events``/``dst_events``, ``seconds`` (virsh migrate's duration)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @property
    def suspended(self):
        return self.src_events.when("Suspended", self.name)

    @property
    def resumed(self):
        return self.dst_events.when("Resumed", self.name)

    def summary(self):
        out = self.traffic.summary(self.resumed)
        out["migrate_s"] = round(self.seconds, 2)
        if self.suspended and self.resumed:
            out["paused_ms"] = round((self.resumed - self.suspended) * 1000.0, 1)
        return out


def observed_migration(lab, name, mac, src, dst, bridge=BRIDGE, settle=0.5, check=True, during=None, extra=()):
    """Migrate NAME from SRC to DST with frames flowing and both kernels sampled.

    ``during(lab)``, if given, runs in a thread alongside the migration (e.g. to destroy the guest
    mid-way)."""
    import threading

    failed = []

    def helper_body(lab):
        try:
            during(lab)
        except BaseException as exc:  # re-raised in the caller's thread
            failed.append(exc)

    with Events(src) as src_events, Events(dst) as dst_events, Timeline(lab, mac, bridge) as timeline, \
            Traffic(lab, mac) as traffic, FdbMonitor(src, mac, bridge) as src_fdb, \
            FdbMonitor(dst, mac, bridge) as dst_fdb:
        time.sleep(settle)
        helper = threading.Thread(target=helper_body, args=(lab,), daemon=True) if during else None
        t0 = time.monotonic()
        if helper:
            helper.start()
        result = lab.migrate(name, src, dst, check=check, extra=extra)
        seconds = time.monotonic() - t0
        if helper:
            helper.join(timeout=120)
        time.sleep(settle)
    if failed:
        raise failed[0]
    return Observed(name=name, result=result, timeline=timeline, traffic=traffic, src_events=src_events,
                    dst_events=dst_events, seconds=seconds, src=src, dst=dst, src_fdb=src_fdb, dst_fdb=dst_fdb)


if __name__ == "__main__":  # manual smoke run: bring the lab up, migrate A -> B -> A, tear down
    import sys

    with two_hosts() as lab:
        print("lab up", lab.timings)
        lab.a.create(diskless_xml("fxd-g1", "52:54:00:fd:00:01"))
        for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
            t = time.monotonic()
            lab.migrate("fxd-g1", src, dst)
            print("migrated %s -> %s in %.2f s; entries A %s B %s" % (
                src.name, dst.name, time.monotonic() - t,
                lab.a.static_entries("52:54:00:fd:00:01"), lab.b.static_entries("52:54:00:fd:00:01")))
        sys.stdout.flush()
