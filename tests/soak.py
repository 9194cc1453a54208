"""A seeded random lifecycle soak of fdbhook against a real libvirtd (issue 18).

One private libvirt host (its own network, mount and UTS namespaces, like
tests/hostlab.py, but alone and named ``tb-soak``): the managed bridge
``tb-br``, a libvirtd 9.0 with the qemu and lxc drivers, fdbhook's hooks in
its own /etc/libvirt/hooks and fdbhookd watching both drivers. The machine's
own libvirtd, /etc/fdbhook, /run/fdbhook are never touched: inside the host
those paths are bind mounts of directories under /tmp/tb-soak.

Guests: diskless QEMU domains (no guest OS: "shutdown" is a destroy) and LXC
containers running /bin/sh. Operations, drawn with ``random.Random(seed)``:
start, destroy, suspend/resume, attach a NIC (QEMU and LXC), detach a NIC
(LXC: a QEMU guest without an OS never completes a detach), libvirtd
restart (guests keep running: the reconnect hook), fdbhookd kill -9 and
restart while idle, config reload (rewritten, sometimes with a typo first).

Invariant after every operation (given up to SETTLE seconds, since
fdbhookd acts on libvirt events): every NIC of a running guest has its port
on tb-br managed (learning and flood off) with a static entry for its MAC and
a record; a paused guest's ports are managed without entries; no record
names a port that is not a running or paused guest's; no port on tb-br has
fdbhook's flags without a record. A violation prints the seed and the
operation number, so ``python3 -m tests.soak --seed S --ops N`` replays it.

Run: ``python3 -m tests.soak --ops 200 --seed 1`` (root); the test
(tests/system/test_soak.py) and the benchmark (bench/soak.py) call ``run``.
"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from fdbhook.txn import process_start
from tests.helpers import stop_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "tb-soak"
BASE = "/tmp/" + PREFIX
NS = PREFIX
BRIDGE = "tb-br"
UPLINK = "tb-up"
PRIVATE_DIRS = ("run", "etc/libvirt", "var/lib/libvirt", "var/cache/libvirt", "var/log/libvirt", "etc/fdbhook")
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SETTLE = 30.0  # seconds an operation's effects may take (fdbhookd acts on events, on a loaded machine)

LIBVIRTD_CONF = 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
QEMU_CONF = """\
user = "root"
group = "root"
cgroup_controllers = [ ]
security_driver = "none"
namespaces = [ ]
stdio_handler = "file"
"""
CONFIG = "[manage]\nbridges = %s\n[daemon]\nresync_interval = 5\n# reload %%d\n" % BRIDGE
HOOK = """#!/bin/sh
# tests/soak.py: fdbhook's hook entry (fdbhookd first, standalone fallback), from a copy of the tree
FDBHOOK_LOG=/var/log/libvirt/fdbhook-hooks.log PYTHONPATH=%(src)s exec %(py)s -c \
'import sys; from fdbhook.client import main; sys.exit(main("%(driver)s"))' "$@"
"""


class SoakError(RuntimeError):
    pass


def run(argv, check=True, timeout=120, env=None):
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise SoakError("%s: exit %d: %s" % (" ".join(map(str, argv)), proc.returncode,
                                             (proc.stderr or proc.stdout)[-1500:]))
    return proc


def ns_json(*args):
    proc = run(args[:1] + ("-n", NS, "-j") + args[1:], check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout) if proc.stdout.strip() else []


def available():
    """None if a private libvirt host can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for path in ("/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/qemu-system-x86_64", "/usr/lib/libvirt/libvirt_lxc",
                 "/usr/bin/nsenter", "/usr/bin/unshare"):
        if not os.path.exists(path):
            return "%s is missing" % path
    try:
        import libvirt  # noqa: F401 - fdbhookd needs it
    except ImportError:
        return "libvirt-python is missing for %s" % sys.executable
    return None


# --- the host ---------------------------------------------------------------------------------------

class Host:
    def __init__(self):
        self.root = os.path.join(BASE, "host")
        self.holder = self.libvirtd = self.fdbhookd = None
        self.src = os.path.join(BASE, "src")

    def path(self, inside):
        return os.path.join(self.root, inside.lstrip("/"))

    def enter(self, argv):
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-u", "-n", "--"] + list(argv)

    def env(self, **extra):
        env = {"PATH": SERVICE_PATH, "HOME": "/root", "LC_ALL": "C"}
        env.update(extra)
        return ["env", "-i"] + ["%s=%s" % kv for kv in env.items()]

    def open(self):
        cleanup()
        os.makedirs(BASE)
        os.chmod(BASE, 0o755)
        # fdbhook as the hooks and fdbhookd run it: a world-readable copy (the checkout may not be)
        shutil.copytree(os.path.join(REPO, "fdbhook"), os.path.join(self.src, "fdbhook"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for d in PRIVATE_DIRS:
            os.makedirs(self.path(d), exist_ok=True)
        with open(self.path("etc/libvirt/libvirtd.conf"), "w") as handle:
            handle.write(LIBVIRTD_CONF)
        with open(self.path("etc/libvirt/qemu.conf"), "w") as handle:
            handle.write(QEMU_CONF)
        os.makedirs(self.path("etc/libvirt/hooks"))
        for driver in ("qemu", "lxc"):
            hook = self.path("etc/libvirt/hooks/" + driver)
            with open(hook, "w") as handle:
                handle.write(HOOK % {"src": self.src, "py": sys.executable, "driver": driver})
            os.chmod(hook, 0o755)
        self.write_config(0)
        run(["ip", "netns", "add", NS])
        run(["ip", "-n", NS, "link", "set", "lo", "up"])
        run(["ip", "-n", NS, "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "-n", NS, "link", "add", UPLINK, "type", "veth", "peer", "name", "tb-upx"])
        run(["ip", "-n", NS, "link", "set", UPLINK, "master", BRIDGE])
        for dev in (UPLINK, "tb-upx", BRIDGE):
            run(["ip", "-n", NS, "link", "set", dev, "up"])
        self._start_holder()
        self.start_fdbhookd()
        self.start_libvirtd()

    def _start_holder(self):
        ready = os.path.join(BASE, "ready")
        cg = os.path.join(BASE, "cgroup")
        os.makedirs(cg)
        binds = " && ".join("mount --bind %s/%s /%s" % (self.root, d, d) for d in PRIVATE_DIRS)
        # A fresh sysfs shows this netns's devices; the host's cgroup v1 controllers are bound back
        # (libvirt_lxc needs them) without the cgroup2 mount it cannot handle (see libvirtd-up.sh).
        inner = ("mount -t sysfs sysfs /sys && mount --rbind %s /sys/fs/cgroup && %s && hostname %s && touch %s "
                 "&& exec sleep infinity" % (cg, binds, PREFIX, ready))
        outer = ("set -e; mount --rbind /sys/fs/cgroup %s; "
                 "if mountpoint -q %s/unified; then umount %s/unified; fi; "
                 "exec nsenter --net=/run/netns/%s sh -c '%s'" % (cg, cg, cg, NS, inner))
        self.holder = subprocess.Popen(["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", outer],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _remember(self.holder.pid)
        deadline = time.monotonic() + 30
        while not os.path.exists(ready) and self.holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.exists(ready):
            raise SoakError("host namespace not ready: %s" % self.holder.stderr.read().decode(errors="replace")
                            if self.holder.poll() is not None else "host namespace not ready")

    def write_config(self, n, typo=False):
        text = CONFIG % n
        if typo:
            text += "[manage]\nbridgez = oops\n"
        path = self.path("etc/fdbhook/fdbhook.conf")
        tmp = path + ".new"
        with open(tmp, "w") as handle:
            handle.write(text)
        os.rename(tmp, path)

    def start_fdbhookd(self):
        log = open(self.path("var/log/libvirt/fdbhookd.log"), "ab")
        self.fdbhookd = subprocess.Popen(
            self.enter(self.env(PYTHONPATH=self.src, FDBHOOK_LOG="/var/log/libvirt/fdbhookd.log")
                       + [sys.executable, "-m", "fdbhook", "daemon", "--uri", "qemu:///system",
                          "--uri", "lxc:///system"]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _remember(self.fdbhookd.pid)
        sock = self.path("run/fdbhook/fdbhookd.sock")
        deadline = time.monotonic() + 60
        while not os.path.exists(sock) and time.monotonic() < deadline:
            if self.fdbhookd.poll() is not None:
                raise SoakError("fdbhookd exited: %s" % self.tail("fdbhookd.log"))
            time.sleep(0.05)

    def kill_fdbhookd(self):
        proc, self.fdbhookd = self.fdbhookd, None
        if proc is not None:
            proc.kill()  # SIGKILL to fdbhookd itself: nsenter and env exec it in place (same pid)
            proc.wait(timeout=30)

    def start_libvirtd(self):
        log = open(self.path("var/log/libvirt/libvirtd.stdout"), "ab")
        self.libvirtd = subprocess.Popen(self.enter(self.env() + ["libvirtd"]), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _remember(self.libvirtd.pid)
        deadline = time.monotonic() + 60
        while self.virsh("uri", check=False, timeout=10).returncode != 0:
            if self.libvirtd.poll() is not None or time.monotonic() > deadline:
                raise SoakError("libvirtd did not come up: %s" % self.tail("libvirtd.log"))
            time.sleep(0.2)

    def stop_libvirtd(self):
        proc, self.libvirtd = self.libvirtd, None
        if proc is None:
            return
        stop_process(proc, timeout=60)

    def virsh(self, *args, check=True, timeout=120, uri="qemu:///system"):
        return run(self.enter(self.env() + ["virsh", "-q", "-c", uri] + list(args)), check=check, timeout=timeout)

    def tail(self, name, size=3000):
        try:
            with open(self.path("var/log/libvirt/" + name), "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - size))
                return handle.read().decode(errors="replace")
        except OSError:
            return ""

    def close(self):
        for uri in ("qemu:///system", "lxc:///system"):
            if self.libvirtd is not None:
                proc = self.virsh("list", "--name", check=False, timeout=60, uri=uri)
                for name in proc.stdout.split():
                    self.virsh("resume", name, check=False, timeout=60, uri=uri)
                    self.virsh("destroy", name, check=False, timeout=60, uri=uri)
        self.stop_libvirtd()
        if self.holder is not None:
            reap_namespace(self.holder.pid)
        if self.fdbhookd is not None:
            self.fdbhookd.terminate()
            try:
                self.fdbhookd.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.fdbhookd.kill()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(timeout=30)
        cleanup()

    # --- what the kernel and the records say ---------------------------------------------------------
    def ports(self):
        """{port: (learning, flood)} of tb-br's ports but the uplink."""
        out = {}
        for link in ns_json("ip", "-d", "link", "show", "master", BRIDGE) or []:
            slave = link.get("linkinfo", {}).get("info_slave_data", {})
            if link["ifname"] != UPLINK:
                out[link["ifname"]] = (slave.get("learning"), slave.get("flood"))
        return out

    def static_entries(self):
        """{(mac, port)} of static entries on tb-br's ports."""
        return {(e["mac"], e["ifname"]) for e in ns_json("bridge", "fdb", "show", "br", BRIDGE) or []
                if e.get("state") == "static" and e.get("master") == BRIDGE and e.get("ifname") != BRIDGE}

    def records(self):
        """{(driver, domain): record} from the state dir (unreadable ones as None)."""
        out = {}
        for path in glob.glob(self.path("run/fdbhook/domains/*.json")):
            try:
                with open(path) as handle:
                    data = json.load(handle)
                out[(data["driver"], data["domain"])] = data
            except (OSError, ValueError, KeyError, TypeError):
                out[(os.path.basename(path), None)] = None
        return out


def _children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
            return [int(c) for c in handle.read().split()]
    except (OSError, ValueError):
        return []


def _thaw_and_kill(pid):
    """SIGKILL ``pid``; first thaw its freezer cgroup (a frozen task cannot die) if it has one of its own."""
    try:
        with open("/proc/%d/cgroup" % pid) as handle:
            for line in handle:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and parts[1] == "freezer" and parts[2].startswith("/machine/"):
                    with open("/sys/fs/cgroup/freezer%s/freezer.state" % parts[2], "w") as state:
                        state.write("THAWED")
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def reap_namespace(holder):
    """Kill whatever still runs in the host's mount or network namespace (exactly: the same
    /proc/PID/ns/mnt or ns/net as the holder; an LXC controller has a mount namespace of its own but
    stays in the host's network namespace), and the containers of those controllers (thawed first)."""
    try:
        mine = {os.readlink("/proc/%d/ns/%s" % (holder, ns)) for ns in ("mnt", "net")}
    except OSError:
        return
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in (holder, os.getpid()):
            continue
        pid = int(name)
        try:
            if not mine & {os.readlink("/proc/%d/ns/%s" % (pid, ns)) for ns in ("mnt", "net")}:
                continue
            exe = os.readlink("/proc/%d/exe" % pid)
        except OSError:
            continue
        if "libvirt_lxc" in exe:
            for child in _children(pid):
                _thaw_and_kill(child)
        _thaw_and_kill(pid)


def _remember(pid):
    with open(os.path.join(BASE, "pids"), "a") as handle:
        handle.write("%d %s\n" % (pid, _start_time(pid)))


def _start_time(pid):
    start = process_start(pid)
    return None if start is None else str(start)


def cleanup():
    """What an earlier (killed) run left: its processes (exact pids), QEMUs, netns, mounts, files."""
    for driver, exe in (("qemu", "qemu-system"), ("lxc", "libvirt_lxc")):  # guests (their controllers)
        for pidfile in glob.glob(os.path.join(BASE, "host", "run", "libvirt", driver, "*.pid")):
            try:
                with open(pidfile) as handle:
                    pid = int(handle.read().strip())
                if exe in os.readlink("/proc/%d/exe" % pid):
                    for child in _children(pid) if driver == "lxc" else ():
                        _thaw_and_kill(child)
                    _thaw_and_kill(pid)
            except (OSError, ValueError):
                pass
    pids = os.path.join(BASE, "pids")
    if os.path.exists(pids):
        with open(pids) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit() and _start_time(int(parts[0])) == parts[1]:
                    try:
                        os.kill(int(parts[0]), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
    if os.path.exists("/run/netns/" + NS):
        run(["ip", "netns", "del", NS], check=False)
    if os.path.isdir(BASE):
        shutil.rmtree(BASE, ignore_errors=True)


# --- guests -------------------------------------------------------------------------------------------

def mac(g, n):
    return "52:54:00:7b:%02x:%02x" % (g, n)


def nic_xml(driver, address):
    model = "<model type='virtio'/><rom enabled='no'/>" if driver == "qemu" else ""
    return "<interface type='bridge'><mac address='%s'/><source bridge='%s'/>%s</interface>" % (address, BRIDGE,
                                                                                                model)


def domain_xml(driver, name, nics):
    if driver == "qemu":
        return ("<domain type='qemu'><name>%s</name><memory unit='MiB'>48</memory><vcpu>1</vcpu>"
                "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
                "<on_poweroff>destroy</on_poweroff><devices>%s</devices></domain>"
                % (name, "".join(nic_xml(driver, m) for m in nics)))
    return ("<domain type='lxc'><name>%s</name><memory unit='MiB'>48</memory>"
            "<os><type>exe</type><init>/bin/sh</init></os><devices>%s<console type='pty'/></devices></domain>"
            % (name, "".join(nic_xml(driver, m) for m in nics)))


class Guest:
    def __init__(self, index, driver):
        self.index, self.driver = index, driver
        self.name = "tb-%s%d" % ("q" if driver == "qemu" else "l", index)
        self.uri = "%s:///system" % driver
        self.next_nic = 1

    def new_mac(self):
        self.next_nic += 1
        return mac(self.index, self.next_nic)


class Libvirt:
    """libvirt-python connections to the host's libvirtd (one per driver), reopened after a restart."""

    def __init__(self, host):
        import libvirt

        self.libvirt = libvirt
        libvirt.registerErrorHandler(lambda *a: None, None)  # errors are exceptions, not stderr lines
        self.sock = host.path("run/libvirt/libvirt-sock")
        self.conns = {}

    def close(self):
        for conn in self.conns.values():
            try:
                conn.close()
            except self.libvirt.libvirtError:
                pass
        self.conns = {}

    def call(self, driver, func):
        """func(connection), reconnecting once if libvirtd went away; SoakError for libvirt's refusal."""
        for attempt in (0, 1):
            conn = self.conns.get(driver)
            try:
                if conn is None or not conn.isAlive():
                    conn = self.conns[driver] = self.libvirt.open("%s+unix:///system?socket=%s" % (driver,
                                                                                                   self.sock))
                return func(conn)
            except self.libvirt.libvirtError as exc:
                alive = False
                try:
                    alive = conn is not None and conn.isAlive()
                except self.libvirt.libvirtError:
                    pass
                if alive or attempt:
                    raise SoakError(str(exc)) from None
                self.conns.pop(driver, None)

    def domain(self, driver, name, what):
        """what(dom), or None if there is no such domain."""
        def func(conn):
            try:
                dom = conn.lookupByName(name)
            except self.libvirt.libvirtError as exc:
                if exc.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            return what(dom)
        return self.call(driver, func)


class Soak:
    """The random operations and the invariant."""

    def __init__(self, host, seed, qemu=2, lxc=2, log=print):
        self.host, self.seed, self.log = host, seed, log
        self.rng = random.Random(seed)
        self.guests = [Guest(i, "qemu") for i in range(qemu)] + [Guest(qemu + i, "lxc") for i in range(lxc)]
        self.counts = {}
        self.violations = []
        self.reloads = 0
        self.ops_done = 0
        self.refusals = {}  # what libvirt refused (not fdbhook): "op driver" -> messages
        self.virt = Libvirt(host)

    def state(self, guest):
        def what(dom):
            code = dom.state()[0]
            return {1: "running", 3: "paused"}.get(code, "other %d" % code)
        return self.virt.domain(guest.driver, guest.name, what) or "shut off"

    def nics(self, guest):
        """[(mac, host-side port)] of a guest's NICs from the live XML."""
        import xml.etree.ElementTree as ET

        text = self.virt.domain(guest.driver, guest.name, lambda dom: dom.XMLDesc(0))
        out = []
        for iface in ET.fromstring(text).iter("interface") if text else ():
            address, target = iface.find("mac"), iface.find("target")
            if iface.get("type") == "bridge" and address is not None and target is not None:
                out.append((address.get("address").lower(), target.get("dev")))
        return out

    # --- operations ---------------------------------------------------------------------------
    def choose(self):
        guest = self.rng.choice(self.guests)
        st = self.state(guest)
        if st == "shut off":
            options = [("start", 6)]
        elif st == "paused":
            # libvirt 9.0 cannot destroy a frozen LXC container on cgroup v1 ("Some processes refused
            # to die"): it stays frozen, its controller alive. Paused LXC guests only resume.
            options = [("resume", 6)] + ([("destroy", 2)] if guest.driver == "qemu" else [])
        else:
            options = [("destroy", 3), ("suspend", 3), ("attach", 3)]
            if guest.driver == "lxc" and len(self.nics(guest)) > 1:
                options.append(("detach", 3))
        if self.rng.random() < 0.1:  # host-wide: one operation in ten
            options = [("libvirtd-restart", 1), ("fdbhookd-kill", 1), ("config-reload", 1)]
        total = sum(w for _, w in options)
        pick = self.rng.uniform(0, total)
        for op, weight in options:
            pick -= weight
            if pick <= 0:
                return op, guest
        return options[-1][0], guest

    def do(self, op, guest):
        h, v, live = self.host, self.virt, 1  # VIR_DOMAIN_AFFECT_LIVE
        if op == "start":
            guest.next_nic = 1
            xml = domain_xml(guest.driver, guest.name, [mac(guest.index, 0), mac(guest.index, 1)])
            v.call(guest.driver, lambda conn: conn.createXML(xml, 0))
        elif op in ("destroy", "suspend", "resume"):
            v.domain(guest.driver, guest.name, lambda dom: getattr(dom, op)())
        elif op == "attach":
            xml = nic_xml(guest.driver, guest.new_mac())
            v.domain(guest.driver, guest.name, lambda dom: dom.attachDeviceFlags(xml, live))
        elif op == "detach":
            victim = self.rng.choice(self.nics(guest)[1:])
            xml = "<interface type='bridge'><mac address='%s'/><source bridge='%s'/></interface>" % (victim[0],
                                                                                                   BRIDGE)
            v.domain(guest.driver, guest.name, lambda dom: dom.detachDeviceFlags(xml, live))
        elif op == "libvirtd-restart":
            # libvirt 9.0 reports a suspended LXC guest as running after a restart, and then cannot
            # destroy it (frozen: "Some processes refused to die"): LXC guests are resumed first.
            for other in self.guests:
                if other.driver == "lxc" and self.state(other) == "paused":
                    v.domain(other.driver, other.name, lambda dom: dom.resume())
            h.stop_libvirtd()
            h.start_libvirtd()
        elif op == "fdbhookd-kill":
            h.kill_fdbhookd()
            h.start_fdbhookd()
        elif op == "config-reload":
            self.reloads += 1
            if self.rng.random() < 0.3:  # a typo first: fdbhookd keeps the last good config
                h.write_config(self.reloads, typo=True)
                time.sleep(0.2)
            h.write_config(self.reloads)
        self.counts[op] = self.counts.get(op, 0) + 1

    # --- the invariant ---------------------------------------------------------------------------
    def problems(self):
        h = self.host
        ports, entries, records = h.ports(), h.static_entries(), h.records()
        out = []
        expected = {}  # port -> (guest, mac, paused)
        for guest in self.guests:
            st = self.state(guest)
            if st not in ("running", "paused"):
                continue
            for address, port in self.nics(guest):
                expected[port] = (guest, address, st == "paused")
        recorded = {}  # port -> (driver, domain, mac)
        for key, data in records.items():
            if data is None:
                out.append("unreadable record %s" % key[0])
                continue
            for nic in data.get("nics", []):
                recorded[nic["port"]] = (data["driver"], data["domain"], nic["mac"], data.get("paused"))
        for port, (guest, address, paused) in expected.items():
            if port not in ports:
                out.append("%s: port %s of %s not on %s" % (guest.name, port, address, BRIDGE))
                continue
            if ports[port] != (False, False):
                out.append("%s: port %s learning/flood %s, want off" % (guest.name, port, ports[port]))
            has_entry = (address, port) in entries
            if has_entry == paused:
                out.append("%s: port %s %s static entry for %s (guest %s)" % (
                    guest.name, port, "has a" if has_entry else "has no", address, "paused" if paused else "running"))
            rec = recorded.get(port)
            if rec is None or rec[:3] != (guest.driver, guest.name, address):
                out.append("%s: port %s has no record for %s (recorded: %s)" % (guest.name, port, address, rec))
        for port, rec in recorded.items():
            if port not in expected:
                out.append("record %s/%s names port %s, which is no guest's now" % (rec[0], rec[1], port))
        for port, flags in ports.items():
            if flags != (True, True) and port not in recorded:
                out.append("port %s has learning/flood %s and no record" % (port, flags))
        return out

    def check(self, n, op, guest):
        deadline = time.monotonic() + SETTLE
        while True:
            found = self.problems()
            if not found:
                return True
            if time.monotonic() > deadline:
                self.violations.append({"op": n, "what": op, "guest": guest.name, "problems": found})
                self.log("VIOLATION after op %d (%s %s), seed %d: %s" % (n, op, guest.name, self.seed,
                                                                         "; ".join(found)))
                return False
            time.sleep(0.1)

    def run(self, ops, stop_on_violation=True):
        t0 = time.monotonic()
        for n in range(1, ops + 1):
            op, guest = self.choose()
            try:
                self.do(op, guest)
            except SoakError as exc:
                # libvirt refusing an operation (a race with the guest's own state, libvirt_lxc's pid
                # file still held after a destroy) is not fdbhook's; a start refused by a hook would
                # be: no guest may be stopped by fdbhook here (every NIC is manageable)
                if op == "start" and ("hook" in str(exc).lower() or "fdbhook" in str(exc)):
                    self.violations.append({"op": n, "what": op, "guest": guest.name, "problems": [str(exc)]})
                    self.log("VIOLATION op %d: start refused, seed %d: %s" % (n, self.seed, exc))
                self.counts["failed " + op] = self.counts.get("failed " + op, 0) + 1
                self.refusals.setdefault("%s %s" % (op, guest.driver), []).append(str(exc).splitlines()[0][:200])
            self.ops_done = n
            if not self.check(n, op, guest) and stop_on_violation:
                break
        self.virt.close()
        return {"seed": self.seed, "ops": self.ops_done, "violations": self.violations, "counts": self.counts,
                "libvirt_refused": {k: sorted(set(v))[:3] for k, v in self.refusals.items()},
                "seconds": round(time.monotonic() - t0, 1),
                "guests": {"qemu": sum(g.driver == "qemu" for g in self.guests),
                           "lxc": sum(g.driver == "lxc" for g in self.guests)},
                "fdbhookd_log_tail": self.host.tail("fdbhookd.log", 1500) if self.violations else ""}


def soak(ops, seed, qemu=2, lxc=2, log=print, stop_on_violation=True):
    """Build the host, run ``ops`` operations from ``seed``, tear down. Returns the summary dict."""
    host = Host()
    try:
        host.open()
        soak = Soak(host, seed, qemu=qemu, lxc=lxc, log=log)
        return soak.run(ops, stop_on_violation=stop_on_violation)
    finally:
        host.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--qemu", type=int, default=2)
    parser.add_argument("--lxc", type=int, default=2)
    args = parser.parse_args(argv)
    why = available()
    if why:
        print("soak: cannot run: %s" % why, file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print("soak: seed %d, %d operations" % (seed, args.ops))
    summary = soak(args.ops, seed, args.qemu, args.lxc)
    print(json.dumps({k: v for k, v in summary.items() if k != "fdbhookd_log_tail"}, indent=1, sort_keys=True))
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
