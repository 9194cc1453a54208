"""Promiscuous-mode payoff, measured inside Debian's full kernel.

Run by bench.py through tests/fullkernel/vng-run.sh (this machine's kernel
has no VLAN filtering). For N guests on a VLAN-filtering bridge with a bond
uplink: the uplink's promiscuity and the unknown-unicast frames delivered to
guests, before and after fdbhook's hook. Prints one line
``FULLKERNEL_JSON: {...}``.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from fdbhook.lab import Lab, count_marked, make_frame  # noqa: E402

WAN = "02:00:00:00:00:fe"


def run(nguests, frames):
    with tempfile.TemporaryDirectory() as tmp, Lab(prefix="fdbfk") as lab:
        conf = os.path.join(tmp, "fdbhook.conf")
        with open(conf, "w") as handle:
            handle.write("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
        env = dict(os.environ, FDBHOOK_CONF=conf, FDBHOOK_STATE_DIR=os.path.join(tmp, "state"),
                   FDBHOOK_LOG=os.path.join(tmp, "log"), FDBHOOK_NO_DAEMON="1", PYTHONPATH=REPO)
        lab.add_bridge("br0")
        lab.ip("link", "set", "br0", "type", "bridge", "vlan_filtering", "1")
        wan = lab.add_bond_uplink("bond0", "upl0", "upl0p", "br0", mac=WAN)
        names = ["vnet%02d" % i for i in range(nguests)]
        taps = {n: lab.add_tap(n, bridge="br0") for n in names}
        macs = {n: "52:54:00:fc:00:%02x" % i for i, n in enumerate(names)}

        def unknown(tag):
            for n in names:  # every guest speaks once: a learning bridge knows it
                taps[n].send(make_frame("ff:ff:ff:ff:ff:ff", macs[n], b"hi" + tag))
            for end in list(taps.values()) + [wan]:
                end.recv_frames(timeout=0.1)
            for _ in range(frames):
                wan.send(make_frame("52:54:00:99:99:99", WAN, b"unk" + tag))
            return sum(count_marked(taps[n].recv_frames(timeout=0.3), b"unk" + tag) for n in names)

        before = {"uplink_promiscuity": lab.promiscuity("bond0"), "unknown_unicast_to_guests": unknown(b"B")}
        for n in names:
            xml = ("<domain type='kvm'><name>g%s</name><devices><interface type='bridge'><mac address='%s'/>"
                   "<source bridge='br0'/><target dev='%s'/></interface></devices></domain>" % (n, macs[n], n))
            subprocess.run(lab.exec_argv([sys.executable, os.path.join(REPO, "hooks", "qemu"), "g" + n, "start",
                                          "begin", "-"]), input=xml.encode(), env=env, check=True)
        after = {"uplink_promiscuity": lab.promiscuity("bond0"), "unknown_unicast_to_guests": unknown(b"A")}
    return {"guests": nguests, "frames": frames, "before": before, "after": after}


if __name__ == "__main__":
    subprocess.run(["modprobe", "-a", "bridge", "bonding", "tun", "veth"], check=True)
    rows = [run(n, 20) for n in (2, 8)]
    print("FULLKERNEL_JSON: " + json.dumps({"kernel": os.uname().release, "rows": rows}))
