"""``fdbhook demo``: the effect of fdbhook, measured, in a throwaway namespace.

Builds a network namespace with a bridge, an uplink (a veth whose far end
plays the outside world) and three real taps standing in for a VM's NICs,
runs the bundled sample domain XML through the real hook path (a
subprocess of ``fdbhook hook qemu ... start``), and measures with raw
Ethernet frames (ethertype 0x88B5, never IP) before and after:

* unknown-unicast frames from the uplink that reach each guest;
* frames addressed to each guest that reach it (must stay complete);
* a guest sending from another guest's MAC: how much of the victim's
  traffic it then receives.

Then it runs the ``stopped`` hook, checks the ports are restored, and
deletes the namespace.
"""

import os
import subprocess
import sys
import tempfile

from fdbhook.lab import Lab, count_marked, make_frame

BRIDGE = "brdemo"
WAN_MAC = "02:00:00:00:00:fe"
UNKNOWN_MAC = "52:54:00:99:99:99"
GUESTS = (("vnetdemo1", "52:54:00:de:00:01"), ("vnetdemo2", "52:54:00:de:00:02"),
          ("vnetdemo3", "52:54:00:de:00:03"))
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "demo-domain.xml")


def _burst(src_end, dst, src, marker, count):
    for i in range(count):
        src_end.send(make_frame(dst, src, marker + b"%04d" % i))


def _collect(ends, marker):
    return {name: count_marked(end.recv_frames(timeout=0.25), marker) for name, end in ends.items()}


def measure(wan, guests, count, phase):
    """Send the three kinds of traffic; return counts per guest."""
    for name, mac in GUESTS:
        # Each guest speaks once, so a learning bridge knows where it is.
        guests[name].send(make_frame("ff:ff:ff:ff:ff:ff", mac, b"hello" + phase))
    for end in list(guests.values()) + [wan]:
        end.recv_frames(timeout=0.1)
    result = {}
    marker = b"unk" + phase
    _burst(wan, UNKNOWN_MAC, WAN_MAC, marker, count)
    result["unknown"] = _collect(guests, marker)
    marker = b"dir" + phase
    for name, mac in GUESTS:
        _burst(wan, mac, WAN_MAC, marker + name[-1:].encode(), count)
    got = {name: end.recv_frames(timeout=0.25) for name, end in guests.items()}
    result["direct"] = {name: count_marked(got[name], marker + name[-1:].encode()) for name, _ in GUESTS}
    result["misdelivered"] = {name: sum(count_marked(got[name], marker + other[-1:].encode())
                                        for other, _ in GUESTS if other != name) for name, _ in GUESTS}
    # guest 3 forges guest 1's MAC, then the outside world talks to guest 1.
    victim_name, victim_mac = GUESTS[0]
    thief_name = GUESTS[2][0]
    guests[thief_name].send(make_frame("ff:ff:ff:ff:ff:ff", victim_mac, b"forge" + phase))
    for end in list(guests.values()) + [wan]:
        end.recv_frames(timeout=0.1)
    marker = b"vic" + phase
    _burst(wan, victim_mac, WAN_MAC, marker, count)
    got = _collect(guests, marker)
    result["forge"] = {"victim": got[victim_name], "thief": got[thief_name]}
    # Let the victim reclaim its MAC so the next phase starts clean.
    guests[victim_name].send(make_frame("ff:ff:ff:ff:ff:ff", victim_mac, b"hello" + phase))
    for end in list(guests.values()) + [wan]:
        end.recv_frames(timeout=0.1)
    return result


def _ports(lab):
    rows = []
    static = {e["mac"]: e for e in lab.fdb(br=BRIDGE) if e.get("state") == "static"}
    for name, mac in GUESTS + (("uplink", None),):
        flags = lab.port_flags(name)
        entry = static.get(mac) if mac else None
        rows.append("  %-10s learning %-3s flood %-3s  %s" % (
            name, "on" if flags.get("learning") else "off", "on" if flags.get("flood") else "off",
            ("fdb %s static%s" % (mac, " sticky" if "sticky" in entry["flags"] else "")) if entry else
            ("fdb -" if mac else "(uplink, not managed)")))
    return rows


def _hook(lab, env, op, data):
    argv = lab.exec_argv([sys.executable, "-m", "fdbhook", "hook", "qemu", "fdbdemo", op, "begin", "-"])
    return subprocess.run(argv, input=data, env=env, capture_output=True, timeout=60)


def _table(out, frames, before, after):
    """The before/after table of frames counted."""
    out("")
    out("%-62s %7s %7s" % ("raw frames (%d sent per kind)" % frames, "before", "after"))
    for name, _ in GUESTS:
        out("%-62s %7d %7d" % ("unknown-unicast from uplink reaching %s" % name,
                               before["unknown"][name], after["unknown"][name]))
    for name, _ in GUESTS:
        out("%-62s %7d %7d" % ("frames to %s's MAC that reached it" % name,
                               before["direct"][name], after["direct"][name]))
    out("%-62s %7d %7d" % ("frames misdelivered to another guest",
                           sum(before["misdelivered"].values()), sum(after["misdelivered"].values())))
    out("%-62s %7d %7d" % ("%s forges %s's MAC: victim's frames the forger got" % (
        GUESTS[2][0], GUESTS[0][0]), before["forge"]["thief"], after["forge"]["thief"]))
    out("%-62s %7d %7d" % ("... and the victim still got", before["forge"]["victim"], after["forge"]["victim"]))


def run_demo(frames=20, out=print):
    """Run the demo; 0 when fdbhook stopped every leak and broke nothing."""
    if os.geteuid() != 0:
        out("fdbhook demo: needs root (it creates a network namespace, a bridge and taps)")
        return 2
    with open(SAMPLE, "rb") as handle:
        xml = handle.read()
    with tempfile.TemporaryDirectory(prefix="fdbhook-demo-") as tmp, Lab(prefix="fdbdemo") as lab:
        conf = os.path.join(tmp, "fdbhook.conf")
        with open(conf, "w") as handle:
            handle.write("[manage]\nbridges = %s\n" % BRIDGE)
        env = dict(os.environ, FDBHOOK_CONF=conf, FDBHOOK_STATE_DIR=os.path.join(tmp, "state"),
                   FDBHOOK_LOG=os.path.join(tmp, "log"),
                   PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lab.add_bridge(BRIDGE)
        wan = lab.add_veth("uplink", "wan", bridge=BRIDGE, mac=WAN_MAC)
        guests = {name: lab.add_tap(name, bridge=BRIDGE) for name, _ in GUESTS}
        out("fdbhook demo in network namespace %s: bridge %s, uplink, 3 taps for domain 'fdbdemo'" % (
            lab.ns, BRIDGE))
        out("")
        out("before (kernel defaults):")
        for row in _ports(lab):
            out(row)
        before = measure(wan, guests, frames, b"B")

        proc = _hook(lab, env, "start", xml)
        out("")
        out("$ fdbhook hook qemu fdbdemo start begin - < %s   -> exit %d" % (SAMPLE, proc.returncode))
        if proc.stderr:
            out("  " + proc.stderr.decode(errors="replace").strip())
        try:
            with open(env["FDBHOOK_LOG"]) as handle:
                for line in handle:
                    out("  log: " + line.split(": ", 1)[-1].rstrip())
        except OSError:
            pass
        out("")
        out("after:")
        for row in _ports(lab):
            out(row)
        after = measure(wan, guests, frames, b"A")

        _table(out, frames, before, after)

        stop = _hook(lab, env, "stopped", b"")
        restored = all(lab.port_flags(name).get("learning") and lab.port_flags(name).get("flood")
                       for name, _ in GUESTS)
        leftover = [e for e in lab.fdb(br=BRIDGE) if e.get("state") == "static"]
        out("")
        out("$ fdbhook hook qemu fdbdemo stopped end -   -> exit %d; ports restored: %s; static entries left: %d"
            % (stop.returncode, "yes" if restored else "NO", len(leftover)))
        leaked = sum(after["unknown"].values())
        ok = (proc.returncode == 0 and leaked == 0 and after["forge"]["thief"] == 0
              and all(after["direct"][n] == frames for n, _ in GUESTS) and restored and not leftover)
        out("")
        out("result: %d of %d unknown-unicast frames reached managed guests (unmanaged baseline: %d of %d)" % (
            leaked, frames * len(GUESTS), sum(before["unknown"].values()), frames * len(GUESTS)))
        out("namespace %s removed" % lab.ns)
    return 0 if ok else 1
