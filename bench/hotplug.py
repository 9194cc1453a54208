"""Hotplug window: from a hot-plugged NIC's port joining the bridge to the
port being managed (learning off, flood off, static entry present).

Needs libvirtd with fdbhook's hooks (sudo ./tests/run or ./install.sh sets
that up) and starts fdbhookd from /opt/fdbhook itself. Uses a bridge and
guests of its own (prefix fdbbench-); the admin's /etc/fdbhook/fdbhook.conf
is saved and put back.
"""

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

PFX = "fdbbench"
BR = PFX + "-br0"
URI = "qemu:///system"
CONF = "/etc/fdbhook/fdbhook.conf"
FDBHOOK = "/opt/fdbhook/bin/fdbhook"


def virsh(*args, check=True):
    proc = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError("virsh %s: %s" % (" ".join(args), proc.stderr.strip()))
    return proc


def available():
    if shutil.which("virsh") is None or not os.path.exists(FDBHOOK):
        return "virsh or /opt/fdbhook missing (run sudo ./tests/run or ./install.sh first)"
    if virsh("uri", check=False).returncode != 0:
        return "libvirtd does not answer on %s (tests/system/libvirtd-up.sh starts it)" % URI
    return None


class Watcher(threading.Thread):
    """Kernel events, timestamped on arrival: when each port joined BR and was managed."""

    def __init__(self, bridge_index, macs):
        super().__init__(daemon=True)
        from pyroute2 import IPRoute

        self.ipr = IPRoute()
        self.ipr.bind(groups=0x1 | 0x4)  # RTMGRP_LINK | RTMGRP_NEIGH
        self.bridge_index = bridge_index
        self.macs = set(macs)
        self.joined = {}  # ifindex -> t
        self.flags_off = {}  # ifindex -> t
        self.entry = {}  # ifindex -> t (static entry for a known MAC)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for msg in self.ipr.get():
                now = time.monotonic()
                event = msg.get("event")
                if event == "RTM_NEWLINK" and msg.get_attr("IFLA_MASTER") == self.bridge_index:
                    idx = msg["index"]
                    self.joined.setdefault(idx, now)
                    info = msg.get_attr("IFLA_LINKINFO")
                    data = info.get_attr("IFLA_INFO_SLAVE_DATA") if info is not None else None
                    if data is not None and data.get_attr("IFLA_BRPORT_LEARNING") == 0 \
                            and data.get_attr("IFLA_BRPORT_UNICAST_FLOOD") == 0:
                        self.flags_off.setdefault(idx, now)
                elif event == "RTM_NEWNEIGH" and msg.get_attr("NDA_LLADDR") in self.macs \
                        and msg["state"] & 0x40:
                    self.entry.setdefault(msg["ifindex"], now)

    def windows_ms(self):
        out = []
        for idx, joined in self.joined.items():
            if idx in self.flags_off and idx in self.entry:
                out.append((max(self.flags_off[idx], self.entry[idx]) - joined) * 1000)
        return out


def bench_hotplug(cycles=100, per_guest=25):
    reason = available()
    if reason:
        return {"skipped": reason}
    saved = open(CONF).read() if os.path.exists(CONF) else None
    log = tempfile.mktemp(prefix="fdbbench-hotplug-", suffix=".log")
    guests = ["%s-hp%d" % (PFX, i) for i in range((cycles + per_guest - 1) // per_guest)]
    daemon = None
    try:
        os.makedirs(os.path.dirname(CONF), exist_ok=True)
        with open(CONF, "w") as handle:
            handle.write("[manage]\nbridges = %s\n" % BR)
        subprocess.run(["ip", "link", "add", BR, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", BR, "up"], check=True)
        bridge_index = int(open("/sys/class/net/%s/ifindex" % BR).read())
        daemon = subprocess.Popen([FDBHOOK, "daemon"], env=dict(os.environ, FDBHOOK_LOG=log),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "qemu:///system: connected" not in _read(log):
            time.sleep(0.1)
        for name in guests:
            xml = ("<domain type='qemu'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
                   "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
                   "<devices/></domain>" % name)
            with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
                handle.write(xml)
                handle.flush()
                virsh("create", handle.name)
        macs = ["52:54:00:b0:%02x:%02x" % (i // 256, i % 256) for i in range(cycles)]
        watcher = Watcher(bridge_index, macs)
        watcher.start()
        for i, mac in enumerate(macs):
            nic = ("<interface type='bridge'><mac address='%s'/><source bridge='%s'/>"
                   "<model type='virtio'/><rom enabled='no'/></interface>" % (mac, BR))
            with tempfile.NamedTemporaryFile("w", suffix=".xml") as handle:
                handle.write(nic)
                handle.flush()
                virsh("attach-device", guests[i // per_guest], handle.name, "--live")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(watcher.windows_ms()) < cycles:
            time.sleep(0.1)
        watcher.stop.set()
        windows = sorted(watcher.windows_ms())
    finally:
        for name in guests:
            virsh("destroy", name, check=False)
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=20)
        subprocess.run(["ip", "link", "del", BR], stderr=subprocess.DEVNULL)
        if saved is None:
            os.unlink(CONF)
        else:
            with open(CONF, "w") as handle:
                handle.write(saved)
        if os.path.exists(log):
            os.unlink(log)
    if not windows:
        return {"skipped": "no hotplug completed"}
    p99 = windows[min(len(windows) - 1, int(round(0.99 * (len(windows) - 1))))]
    return {"cycles": cycles, "managed": len(windows), "p50_ms": round(statistics.median(windows), 1),
            "p99_ms": round(p99, 1), "max_ms": round(windows[-1], 1)}


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


if __name__ == "__main__":
    print(bench_hotplug())
