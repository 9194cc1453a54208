"""Helpers for the system tier: a real libvirtd running fdbhook's installed hooks.

Everything here reads the result through iproute2's JSON (``ip -d -j``,
``bridge -j``), virsh and the files fdbhook writes - never through fdbhook's
own code - because the hooks under test run in libvirtd's processes, from
the copy install.sh put into the virtualenv.
"""

import json
import os
import subprocess
import time
import xml.etree.ElementTree as ET

PFX = "fdbe2e"
QEMU = "qemu:///system"
LXC = "lxc:///system"
URIS = {"qemu": QEMU, "lxc": LXC}

BR = "fdbe2e-br0"  # managed (config: bridges = fdbe2e-br*)
UM = "fdbe2e-um0"  # not managed
NET = "fdbe2e-net"  # managed libvirt network (config: networks = fdbe2e-net*)
NET_BR = "fdbe2e-nbr"  # its bridge: matched only through the network's name
TAP = "fdbe2e-tap0"  # pre-created tap on BR for the type='ethernet' NIC
FOREIGN = ("fdbe2e-fx0", "fdbe2e-fx1")  # veth pair; fx0 is a port of BR

CONF = "/etc/fdbhook/fdbhook.conf"
STATE_DIR = "/run/fdbhook"
RECORD_DIR = os.path.join(STATE_DIR, "domains")
HOOK_DIR = "/etc/libvirt/hooks"
MARKER = "fdbhook-hook"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBVIRTD_UP = os.path.join(REPO, "tests", "system", "libvirtd-up.sh")
FDBNS = "urn:x-fdbhook:1"

# What the test process passes on to the commands it runs: no FDBHOOK_*
# (the hooks do not get them either), C locale for stable virsh messages.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("FDBHOOK_")}
CLEAN_ENV["LC_ALL"] = "C"


def run(*argv, check=True, timeout=60, input=None):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input, env=CLEAN_ENV)
    if check and proc.returncode != 0:
        raise AssertionError("%s: rc=%d\nstdout: %s\nstderr: %s"
                             % (" ".join(argv), proc.returncode, proc.stdout, proc.stderr))
    return proc


def virsh(uri, *args, check=True, timeout=60):
    return run("virsh", "-q", "-c", uri, *args, check=check, timeout=timeout)


def poll(predicate, timeout=10.0, interval=0.05):
    """True as soon as predicate() is; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- kernel state, through iproute2 -----------------------------------------

def link(dev):
    """``ip -d -j link show dev DEV`` as one dict, or None if it does not exist."""
    proc = run("ip", "-d", "-j", "link", "show", "dev", dev, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return json.loads(proc.stdout)[0]


def port(dev):
    """Bridge-port view of DEV: master, learning, flood (None if DEV is gone)."""
    info = link(dev)
    if info is None:
        return None
    slave = info.get("linkinfo", {}).get("info_slave_data", {})
    return {"ifindex": info["ifindex"], "master": info.get("master"), "learning": slave.get("learning"),
            "flood": slave.get("flood"), "operstate": info.get("operstate")}


def fdb(bridge):
    """``bridge -j fdb show br BRIDGE``: every entry of the bridge."""
    proc = run("bridge", "-j", "fdb", "show", "br", bridge, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return json.loads(proc.stdout)


def static_entries(bridge, mac=None):
    """Static master entries on the bridge's ports (optionally only for MAC)."""
    return [e for e in fdb(bridge) if e.get("state") == "static" and e.get("master") == bridge
            and (mac is None or e["mac"] == mac.lower())]


def ipv6_addrs(dev):
    proc = run("ip", "-j", "-6", "addr", "show", "dev", dev, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [a["local"] for i in json.loads(proc.stdout) for a in i.get("addr_info", [])]


def lxc_init_pid(name):
    """The container's init (child of its libvirt_lxc controller), or None."""
    try:
        with open("/run/libvirt/lxc/%s.pid" % name) as handle:
            controller = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:  # no procps on minimal systems: the kernel's list of children
        with open("/proc/%d/task/%d/children" % (controller, controller)) as handle:
            children = handle.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def netns_ipv6(pid):
    """{ifname: [IPv6 addresses]} inside the network namespace of process PID."""
    links = json.loads(run("nsenter", "-t", str(pid), "-n", "ip", "-j", "link", "show").stdout or "[]")
    out = {link["ifname"]: [] for link in links}
    proc = run("nsenter", "-t", str(pid), "-n", "ip", "-j", "-6", "addr", "show")
    for i in json.loads(proc.stdout or "[]"):
        out[i["ifname"]] = [a["local"] for a in i.get("addr_info", [])]
    return out


def sysctl_path(key):
    return "/proc/sys/" + key.replace(".", "/")


# --- fdbhook's files -----------------------------------------------------------

def record_path(driver, name):
    return os.path.join(RECORD_DIR, "%s-%s.json" % (driver, name))


def record(driver, name):
    try:
        with open(record_path(driver, name), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def state_files():
    """Every file under the state dir (records, bridge notes, temporaries)."""
    out = []
    for root, _, files in os.walk(STATE_DIR):
        out.extend(os.path.join(root, f) for f in files)
    return sorted(out)


def spool(directory):
    """{name: size} of the capture spool."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = os.stat(os.path.join(directory, name)).st_size
        except FileNotFoundError:
            pass
    return out


def captures(directory, driver, obj, op=None):
    """Capture records for DRIVER OBJECT [OP], oldest first, as (path, record)."""
    out = []
    for name in sorted(spool(directory)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as handle:
                rec = json.load(handle)
        except (OSError, ValueError):
            continue
        argv = rec.get("argv") or []
        if rec.get("driver") == driver and argv[:1] == [obj] and (op is None or argv[1:2] == [op]):
            out.append((path, rec))
    return out


# --- domain XML ------------------------------------------------------------------

def nic_bridge(mac, bridge, driver="qemu"):
    return ("<interface type='bridge'><mac address='%s'/><source bridge='%s'/>%s</interface>"
            % (mac, bridge, _model(driver)))


def nic_network(mac, network, driver="qemu"):
    return ("<interface type='network'><mac address='%s'/><source network='%s'/>%s</interface>"
            % (mac, network, _model(driver)))


def nic_ethernet(mac, dev):
    """A type='ethernet' NIC on a tap the test created (libvirt leaves it alone)."""
    return ("<interface type='ethernet'><mac address='%s'/><target dev='%s' managed='no'/>%s</interface>"
            % (mac, dev, _model("qemu")))


def _model(driver):
    # No option ROM: the diskless guest never PXE-boots (no IP traffic at all).
    return "<model type='virtio'/><rom enabled='no'/>" if driver == "qemu" else ""


def metadata(mode=None, nic_off=()):
    attrs = " mode='%s'" % mode if mode else ""
    inner = "".join("<fdb:interface mac='%s' mode='off'/>" % mac for mac in nic_off)
    return "<metadata><fdb:fdb xmlns:fdb='%s'%s>%s</fdb:fdb></metadata>" % (FDBNS, attrs, inner)


def domain_xml(driver, name, nics, meta=""):
    if driver == "qemu":
        return ("<domain type='qemu'><name>%s</name>%s<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
                "<on_poweroff>destroy</on_poweroff><devices>%s</devices></domain>"
                % (name, meta, "".join(nics)))
    return ("<domain type='lxc'><name>%s</name>%s<memory unit='MiB'>64</memory>"
            "<os><type>exe</type><init>/bin/sh</init></os>"
            "<devices>%s<console type='pty'/></devices></domain>" % (name, meta, "".join(nics)))


def live_nics(uri, name):
    """[{type, mac, dev, source}] from the running domain's XML (dev: the host-side port)."""
    root = ET.fromstring(virsh(uri, "dumpxml", name).stdout)
    out = []
    for iface in root.iter("interface"):
        mac = iface.find("mac")
        target = iface.find("target")
        source = iface.find("source")
        out.append({
            "type": iface.get("type"),
            "mac": mac.get("address") if mac is not None else None,
            "dev": target.get("dev") if target is not None else None,
            "source": dict(source.attrib) if source is not None else {},
        })
    return out


def dev_of(uri, name, mac):
    for nic in live_nics(uri, name):
        if nic["mac"] == mac:
            return nic["dev"]
    raise AssertionError("%s has no NIC %s" % (name, mac))


def domain_state(uri, name):
    proc = virsh(uri, "domstate", name, check=False)
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def hook_targets():
    """{driver: path} of fdbhook's installed hooks (main script or DRIVER.d/50-fdbhook)."""
    out = {}
    for driver in ("qemu", "lxc", "network"):
        for path in (os.path.join(HOOK_DIR, driver), os.path.join(HOOK_DIR, driver + ".d", "50-fdbhook")):
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    head = handle.read(512)
            except OSError:
                continue
            if MARKER in head and os.access(path, os.X_OK):
                out[driver] = path
                break
    return out


def process_start_since_boot(pid):
    """When process PID started, in seconds since boot (10 ms clock ticks)."""
    with open("/proc/%d/stat" % pid) as handle:
        ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def mtime_since_boot(path):
    """A file's mtime on the same clock as process_start_since_boot."""
    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    return os.stat(path).st_mtime - (time.time() - uptime)


def pids_of(exe_name):
    """This system's daemon EXE_NAME: the pid in /run/EXE_NAME.pid if that process is
    EXE_NAME and sees the same pid file (not a namesake in another container or
    chroot sharing the PID namespace; no procps needed). [] or [pid]."""
    path = "/run/%s.pid" % exe_name
    try:
        with open(path) as handle:
            pid = int(handle.read().split()[0])
        exe = os.readlink("/proc/%d/exe" % pid)
        ours, theirs = os.stat(path), os.stat("/proc/%d/root%s" % (pid, path))
    except (OSError, ValueError, IndexError):
        return []
    if os.path.basename(exe.replace(" (deleted)", "")) != exe_name:
        return []
    return [pid] if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino) else []


class Fdbhookd:
    """fdbhookd from the installed virtualenv, logging to a file (the system tiers' daemon)."""

    CONNECTED = "libvirt qemu:///system: connected"
    PROGRAM = "/opt/fdbhook/bin/fdbhook"

    def __init__(self, log):
        self.log = log
        self.proc = None

    def start(self):
        before = self.text().count(self.CONNECTED)
        self.proc = subprocess.Popen([self.PROGRAM, "daemon"], env=dict(CLEAN_ENV, FDBHOOK_LOG=self.log),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert poll(lambda: self.text().count(self.CONNECTED) > before, timeout=20), self.text()
        return self

    def stop(self, kill=False):
        if self.proc is not None and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            self.proc.wait(timeout=20)

    def text(self):
        try:
            with open(self.log, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""
