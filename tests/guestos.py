"""A real guest OS for the libvirt tiers: Debian's kernel + a tiny busybox initramfs.

The guest is booted directly (``<os><kernel>/<initrd>/<cmdline>``), reaches
its shell in seconds under TCG, loads virtio_net (and its failover
dependencies) from the host's Debian kernel modules, brings every ethN up
with IPv6 disabled (so it sends nothing on its own) and runs ``fxpkt``
(tests/guest/fxpkt.c, compiled with the host's ``gcc -static``) on each:
every 0x88B5 frame it receives is counted by marker and packet type, and a
frame for its MAC whose payload starts with ``PING`` is answered with
``PONG`` to the sender. PCI hot-unplug is acknowledged by the kernel itself
(acpiphp is built into Debian's kernel; machine 'pc' with ``<acpi/>``).

API (all another test or lab needs):

``image()`` -> ``Image(kernel, initrd, cmdline)``
    builds once, cached in /var/cache/fdbhook-tests/guest-<hash>/ (the hash
    covers the kernel, the modules, busybox, fxpkt.c and the init script);
    installs linux-image-amd64 / busybox-static / gcc if missing (root).
``nic_xml(mac, bridge=None, network=None, trust=False, alias=None)``
    an ``<interface>`` with virtio, ``<rom enabled='no'/>`` and, with
    ``trust``, ``trustGuestRxFilters='yes'``. ``alias`` must start "ua-".
``domain_xml(name, nics, console_log, control_sock, img=None, memory_mib=192, virt_type='qemu', boot=())``
    the whole domain: serial 0 (the kernel console) goes to the file
    ``console_log``, serial 1 is a UNIX socket at ``control_sock`` (QEMU
    listens; connect with ``Control``). ``boot``: commands the init runs
    before it listens (same words as Control's, e.g. ``("mac eth0 X",)``).
``Control(control_sock)`` -> the guest's command channel:
    ``wait_ready(timeout)``; ``call(cmd, *args) -> [lines]`` (AssertionError
    if the command failed); helpers ``set_mac(iface, mac)`` -> guest
    CLOCK_REALTIME just before and after ``ip link set IFACE address MAC``;
    ``counts(iface)`` -> {(marker, pkttype): n}; ``received(iface, marker)``
    (frames for its own MAC, pkttype host); ``send(iface, dst, n, marker)``;
    ``clock_offset()`` -> guest realtime minus host realtime (seconds,
    from the fastest of a few round trips) and its uncertainty; ``close()``.
    The connection survives nothing: reconnect after a migration.
``console_text(console_log)`` -> what the guest printed; lines starting with
    ``FXB `` are the init's own (``FXB ready``, ``FXB mac eth0 MAC T0 T1``).

Guest side commands: ping, now, mac IFACE MAC, count IFACE, send IFACE DST N
MARKER, serve IFACE, links, sh CMD... (busybox sh -c).
"""

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
FXPKT_SRC = os.path.join(HERE, "guest", "fxpkt.c")
CACHE = os.environ.get("FDBHOOK_GUEST_CACHE", "/var/cache/fdbhook-tests")
BUSYBOX = "/bin/busybox"
# virtio_net's dependencies come from modules.dep; these are the roots.
MODULES = ("virtio_pci", "virtio_net")
CMDLINE = "console=ttyS0 loglevel=4 ipv6.disable=1 panic=-1 random.trust_cpu=on"
APT = ("linux-image-amd64", "busybox-static", "gcc", "libc6-dev")

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run
mount -t tmpfs run /run
say() { echo "FXB $*" > /dev/ttyS0; }
for m in $(cat /modules/order); do insmod /modules/$m.ko || say "insmod $m failed"; done
ip link set lo up
serve() {
    ip link set "$1" up
    fxpkt serve "$1" "/run/count-$1" > /dev/ttyS0 2>&1 &
}
n=0
while [ $n -lt 50 ] && ! ls /sys/class/net | grep -q eth; do usleep 100000; n=$((n+1)); done
for i in $(ls /sys/class/net | grep eth); do serve $i; done
run() {
    cmd=$1; shift
    case "$cmd" in
    ping) echo pong ;;
    now) fxpkt now ;;
    mac) t0=$(fxpkt now); ip link set "$1" address "$2" || return 1; t1=$(fxpkt now)
         say "mac $1 $2 $t0 $t1"; echo "$t0 $t1" ;;
    count) cat "/run/count-$1" ;;
    send) fxpkt send "$@" ;;
    serve) serve "$1" ;;
    links) ip -o link ;;
    sh) sh -c "$*" ;;
    *) echo "unknown command $cmd"; return 2 ;;
    esac
}
for c in $(cat /proc/cmdline); do
    case "$c" in fxb.boot=*) echo "${c#fxb.boot=}" | tr ';' '\n' | tr ',' ' ' > /run/boot ;; esac
done
if [ -f /run/boot ]; then
    while read -r line; do [ -n "$line" ] && { run $line > /dev/ttyS0 2>&1; say "boot $line -> $?"; }; done < /run/boot
fi
say "ready $(ls /sys/class/net | grep eth | tr '\n' ' ')"
stty -F /dev/ttyS1 raw -echo
exec 3<>/dev/ttyS1
while true; do
    while read -r id cmd args <&3; do
        [ -n "$cmd" ] || continue
        run $cmd $args >&3 2>&1
        echo "$id END $?" >&3
    done
    usleep 100000
done
"""


@dataclass(frozen=True)
class Image:
    kernel: str
    initrd: str
    cmdline: str = CMDLINE


# --- building ----------------------------------------------------------------------

def _kernel_release():
    """Newest Debian kernel in /boot with its modules (never required to be the running one)."""
    found = []
    for name in os.listdir("/boot"):
        if name.startswith("vmlinuz-") and name.endswith("-amd64"):
            release = name[len("vmlinuz-"):]
            if os.path.isdir("/lib/modules/%s/kernel" % release):
                found.append(release)
    if not found:
        return None
    return sorted(found, key=lambda r: [(0, int(p), "") if p.isdigit() else (1, 0, p)
                                        for p in re.split(r"[.+-]", r)])[-1]


def _ensure_packages():
    missing = [p for p in APT if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                text=True).stdout.find("install ok installed") < 0]
    if _kernel_release() is None and "linux-image-amd64" not in missing:
        missing.append("linux-image-amd64")
    if missing:
        argv = ["apt-get", "-o", "DPkg::Lock::Timeout=900", "install", "-y", "-q", "--no-install-recommends"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = subprocess.run(argv + missing, capture_output=True, text=True, env=env)
        if proc.returncode != 0:  # lists too old or absent on a fresh machine
            subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=900", "update", "-q"], capture_output=True, env=env)
            proc = subprocess.run(argv + missing, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError("guest image: apt-get install %s failed: %s" % (" ".join(missing),
                                                                              proc.stderr.strip()[-500:]))


def _module_files(release):
    """Module names in load order (dependencies first) and their paths."""
    base = "/lib/modules/%s" % release
    deps = {}
    with open(os.path.join(base, "modules.dep")) as handle:
        for line in handle:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
    by_name = {_mod_name(p): p for p in deps}
    order = []

    def visit(path):
        for dep in reversed(deps[path]):  # modules.dep lists the deepest dependency last
            visit(dep)
        if path not in order:
            order.append(path)

    for name in MODULES:
        if name in by_name:  # else built in (Debian 13's kernel has virtio_pci built in)
            visit(by_name[name])
    return [(_mod_name(p), os.path.join(base, p)) for p in order]


def _mod_name(path):
    name = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            return name[: -len(suffix)].replace("-", "_")
    return name


def _module_bytes(path):
    with open(path, "rb") as handle:
        data = handle.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", path], check=True, capture_output=True).stdout
    return data


class _Cpio:
    """newc archive writer (what the kernel unpacks as initramfs)."""

    def __init__(self):
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name, mode, data=b""):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join("%08X" % v for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        self.ino += 1
        self.out.write(hdr.encode() + name_b)
        self.out.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name, data, mode=0o644):
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def _compile_fxpkt(dest):
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", dest, FXPKT_SRC], check=True, capture_output=True)


def _digest(release, modules):
    """Cache key: the packaged files by path, size and mtime; our own sources by content
    (a fresh checkout or copy of the tree must hit the same cache)."""
    h = hashlib.sha256()
    for path in [BUSYBOX, "/boot/vmlinuz-%s" % release] + [p for _, p in modules]:
        st = os.stat(path)
        h.update(("%s %d %d\n" % (path, st.st_size, st.st_mtime_ns)).encode())
    with open(FXPKT_SRC, "rb") as handle:
        h.update(handle.read())
    h.update(INIT.encode())
    return h.hexdigest()[:16]


def image():
    """Build (or reuse) the guest image; returns Image. Needs root the first time."""
    release = _kernel_release()
    if release is None or not os.path.exists(BUSYBOX) or shutil.which("gcc") is None:
        _ensure_packages()
        release = _kernel_release()
    modules = _module_files(release)
    out = os.path.join(CACHE, "guest-" + _digest(release, modules))
    img = Image(kernel=os.path.join(out, "vmlinuz"), initrd=os.path.join(out, "initrd.gz"))
    if os.path.exists(os.path.join(out, "done")):
        return img
    _ensure_packages()  # gcc and libc6-dev for fxpkt (a no-op when all are there)
    tmp = out + ".tmp%d" % os.getpid()
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _compile_fxpkt(os.path.join(tmp, "fxpkt"))
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "run", "tmp", "modules"):
        cpio.dir(d)
    with open(BUSYBOX, "rb") as handle:
        cpio.file("bin/busybox", handle.read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    with open(os.path.join(tmp, "fxpkt"), "rb") as handle:
        cpio.file("bin/fxpkt", handle.read(), 0o755)
    cpio.file("init", INIT.encode(), 0o755)
    for name, path in modules:
        cpio.file("modules/%s.ko" % name, _module_bytes(path))
    cpio.file("modules/order", ("\n".join(n for n, _ in modules) + "\n").encode())
    with gzip.open(os.path.join(tmp, "initrd.gz"), "wb", compresslevel=6) as handle:
        handle.write(cpio.finish())
    shutil.copyfile("/boot/vmlinuz-%s" % release, os.path.join(tmp, "vmlinuz"))
    with open(os.path.join(tmp, "done"), "w") as handle:
        json.dump({"kernel": release, "modules": [n for n, _ in modules]}, handle)
    os.makedirs(CACHE, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # built concurrently by someone else: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return img


# --- domain XML --------------------------------------------------------------------------

def nic_xml(mac, bridge=None, network=None, trust=False, alias=None):
    """One virtio <interface> on ``bridge`` (type='bridge') or ``network`` (type='network')."""
    kind, source = ("bridge", "bridge='%s'" % bridge) if bridge else ("network", "network='%s'" % network)
    attrs = " trustGuestRxFilters='yes'" if trust else ""
    extra = "<alias name='%s'/>" % alias if alias else ""
    return ("<interface type='%s'%s><mac address='%s'/><source %s/><model type='virtio'/>"
            "<rom enabled='no'/>%s</interface>" % (kind, attrs, mac, source, extra))


def domain_xml(name, nics, console_log, control_sock, img=None, memory_mib=192, virt_type="qemu", boot=(),
               metadata=""):
    """The guest's domain XML (direct kernel boot, console to a file, control channel on a UNIX socket)."""
    img = img or image()
    cmdline = img.cmdline
    if boot:
        cmdline += " fxb.boot=" + ";".join(c.replace(" ", ",") for c in boot)
    return (
        "<domain type='%s'><name>%s</name>%s<memory unit='MiB'>%d</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type><kernel>%s</kernel><initrd>%s</initrd>"
        "<cmdline>%s</cmdline></os><features><acpi/></features>"
        "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
        "<devices>%s"
        "<serial type='file'><source path='%s'/><target port='0'/></serial>"
        "<serial type='unix'><source mode='bind' path='%s'/><target port='1'/></serial>"
        "<memballoon model='none'/></devices></domain>"
        % (virt_type, name, metadata, memory_mib, img.kernel, img.initrd, cmdline, "".join(nics),
           console_log, control_sock))


def console_text(console_log):
    try:
        with open(console_log, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""


# --- the command channel -----------------------------------------------------------------

class Control:
    """The guest's command channel (serial 1, a UNIX socket QEMU listens on)."""

    def __init__(self, path):
        self.path = path
        self.sock = None
        self.buf = b""
        self.seq = 0

    def _connect(self, deadline):
        while self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                self.sock = sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise AssertionError("guest control socket %s: cannot connect" % self.path) from None
                time.sleep(0.1)

    def _line(self, deadline):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not data:
                raise AssertionError("guest control socket %s closed" % self.path)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def raw_call(self, cmd, *args, timeout=30.0):
        """(exit status, output lines) of one command, or (None, lines so far) on timeout."""
        deadline = time.monotonic() + timeout
        self._connect(deadline)
        self.seq += 1
        tag = "c%d" % self.seq
        self.sock.sendall(("%s %s\n" % (tag, " ".join((cmd,) + tuple(str(a) for a in args)))).encode())
        lines = []
        while True:
            line = self._line(deadline)
            if line is None:
                return None, lines
            if line.startswith(tag + " END "):
                return int(line.split()[-1]), lines
            if line.startswith("c") and " END " in line:
                continue  # the end of an earlier, timed-out command
            lines.append(line)

    def call(self, cmd, *args, timeout=30.0):
        rc, lines = self.raw_call(cmd, *args, timeout=timeout)
        if rc != 0:
            raise AssertionError("guest command %s %s: %s\n%s" % (cmd, " ".join(map(str, args)),
                                                                  "timeout" if rc is None else "exit %d" % rc,
                                                                  "\n".join(lines)))
        return lines

    def wait_ready(self, timeout=90.0):
        """Until the guest's init answers (boot under TCG: a few seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                rc, lines = self.raw_call("ping", timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            except AssertionError:
                rc, lines = None, []
                self.close()
                time.sleep(0.2)
            if rc == 0 and "pong" in lines:
                return
            if time.monotonic() > deadline:
                raise AssertionError("guest on %s never answered" % self.path)

    def set_mac(self, iface, mac):
        """Run ``ip link set IFACE address MAC`` in the guest: its (CLOCK_REALTIME before, after)."""
        t0, t1 = self.call("mac", iface, mac)[-1].split()
        return float(t0), float(t1)

    def counts(self, iface):
        out = {}
        for line in self.call("count", iface):
            parts = line.split()
            if len(parts) == 3:
                out[(parts[0], parts[1])] = int(parts[2])
        return out

    def received(self, iface, marker, kind="host"):
        return self.counts(iface).get((marker, kind), 0)

    def send(self, iface, dst, n, marker):
        self.call("send", iface, dst, n, marker)

    def clock_offset(self, rounds=5):
        """(guest realtime - host realtime, half the best round trip) in seconds."""
        best = None
        for _ in range(rounds):
            t0 = time.time()
            guest = float(self.call("now")[-1])
            t1 = time.time()
            if best is None or t1 - t0 < best[1] * 2:
                best = (guest - (t0 + t1) / 2, (t1 - t0) / 2)
        return best

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.buf = b""
