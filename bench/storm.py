"""Unknown-unicast storm: what the host saves once fdbhook stops the flooding (issue 14).

Run inside Debian's full kernel by bench.py (``--only storm``) through
tests/fullkernel/vng-run.sh, because it needs pktgen (this machine's kernel
has no modules). For 8 and 32 guest taps on a bridge with a veth uplink,
side by side, unmanaged (learning, flooding) and managed by fdbhook's hook:

* pktgen sends STORM frames to an unknown unicast MAC into the uplink; the
  kernel's CPU time (system + softirq, all CPUs, /proc/stat) per million
  storm frames;
* meanwhile a sender on the uplink sends legitimate frames to guest 0 and the
  guest (its tap, read as fast as Python can) counts what still reaches it;
* the floor: the same storm into a bridge with no guest port at all, i.e.
  the per-frame cost of a frame that the bridge drops at ingress.

Prints one line ``STORM_JSON: {...}``. Numbers are under TCG (no KVM in the
nested guest): compare the rows of one run, not the absolute values.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from fdbhook.lab import Lab, count_marked, make_frame  # noqa: E402

WAN = "02:00:00:00:00:fe"
UNKNOWN = "52:54:00:99:99:99"
PGDIR = "/proc/net/pktgen"


def cpu_ticks():
    """(system + softirq + irq) jiffies over all CPUs."""
    with open("/proc/stat") as handle:
        fields = handle.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq = (int(x) for x in fields[:7])
    return system + irq + softirq


def pg(path, command):
    with open(path, "w") as handle:
        handle.write(command + "\n")


def pktgen_storm(ns, dev, frames):
    """pktgen: FRAMES 60-byte frames to UNKNOWN out of DEV (in netns NS); returns the seconds it took."""
    # pktgen's /proc files are per network namespace: configure them from inside it.
    script = "; ".join([
        "echo rem_device_all > %s/kpktgend_0" % PGDIR,
        "echo add_device %s > %s/kpktgend_0" % (dev, PGDIR),
        "echo 'count %d' > %s/%s" % (frames, PGDIR, dev),
        "echo 'pkt_size 60' > %s/%s" % (PGDIR, dev),
        "echo 'delay 0' > %s/%s" % (PGDIR, dev),
        "echo 'dst_mac %s' > %s/%s" % (UNKNOWN, PGDIR, dev),
        "echo 'src_mac %s' > %s/%s" % (WAN, PGDIR, dev),
        "echo start > %s/pgctrl" % PGDIR,
    ])
    start = time.monotonic()
    subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script], check=True)
    return time.monotonic() - start


def run(nguests, frames, managed):
    with tempfile.TemporaryDirectory() as tmp, Lab(prefix="fdbst") as lab:
        conf = os.path.join(tmp, "fdbhook.conf")
        with open(conf, "w") as handle:
            handle.write("[manage]\nbridges = br0\n")
        env = dict(os.environ, FDBHOOK_CONF=conf, FDBHOOK_STATE_DIR=os.path.join(tmp, "state"),
                   FDBHOOK_LOG=os.path.join(tmp, "log"), FDBHOOK_NO_DAEMON="1", PYTHONPATH=REPO)
        lab.add_bridge("br0")
        wan = lab.add_veth("upl0", "wan", bridge="br0", mac=WAN)
        names = ["vnet%02d" % i for i in range(nguests)]
        taps = {n: lab.add_tap(n, bridge="br0") for n in names}
        macs = {n: "52:54:00:fd:00:%02x" % i for i, n in enumerate(names)}
        for n in names:
            taps[n].send(make_frame("ff:ff:ff:ff:ff:ff", macs[n], b"hi"))
        if managed:
            for n in names:
                xml = ("<domain type='kvm'><name>g%s</name><devices><interface type='bridge'><mac address='%s'/>"
                       "<source bridge='br0'/><target dev='%s'/></interface></devices></domain>" % (n, macs[n], n))
                subprocess.run(lab.exec_argv([sys.executable, os.path.join(REPO, "hooks", "qemu"), "g" + n,
                                              "start", "begin", "-"]), input=xml.encode(), env=env, check=True)
        for end in list(taps.values()) + [wan]:
            end.recv_frames(timeout=0.1)

        # 1. the kernel's cost: the storm alone, nothing else running in the guest
        ticks = cpu_ticks()
        seconds = pktgen_storm(lab.ns, "wan", frames)
        cpu = (cpu_ticks() - ticks) / os.sysconf("SC_CLK_TCK")
        row = {"guests": nguests, "managed": managed, "frames": frames, "storm_s": round(seconds, 3),
               "kernel_cpu_s": round(cpu, 3), "cpu_s_per_million": round(cpu / frames * 1e6, 3)}
        if names:
            row.update(busy_guest(lab, wan, taps[names[0]], macs[names[0]], frames))
        return row


def busy_guest(lab, wan, tap, mac, frames):
    """2. the same storm again, while legitimate frames go to one guest that reads its tap as fast as it can."""
    got = {"legit": 0, "sent": 0}
    stop = threading.Event()

    def guest():
        while not stop.is_set():
            got["legit"] += count_marked(tap.recv_frames(timeout=0.05, max_wait=0.5), b"legit")

    def sender():
        frame = make_frame(mac, WAN, b"legit")
        while not stop.is_set():
            wan.send(frame)
            got["sent"] += 1
            time.sleep(0.0005)

    threads = [threading.Thread(target=guest), threading.Thread(target=sender)]
    for t in threads:
        t.start()
    seconds = pktgen_storm(lab.ns, "wan", frames)
    stop.set()
    for t in threads:
        t.join()
    got["legit"] += count_marked(tap.recv_frames(timeout=0.2), b"legit")
    return {"legit_sent": got["sent"], "legit_received": got["legit"],
            "legit_received_per_s": round(got["legit"] / seconds, 1)}


if __name__ == "__main__":
    subprocess.run(["modprobe", "-a", "bridge", "tun", "veth", "pktgen"], check=True)
    frames = int(os.environ.get("STORM_FRAMES", "100000"))
    sizes = [int(x) for x in os.environ.get("STORM_GUESTS", "8 32").split()]
    rows = [run(0, frames, False)]
    print("storm: %s" % rows[-1], file=sys.stderr, flush=True)
    for n in sizes:
        for managed in (False, True):
            rows.append(run(n, frames, managed))
            print("storm: %s" % rows[-1], file=sys.stderr, flush=True)
    print("STORM_JSON: " + json.dumps({"kernel": os.uname().release, "rows": rows}))
