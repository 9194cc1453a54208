"""Runs INSIDE Debian's full kernel under virtme-ng (see test_fullkernel.py).

A VLAN-filtering bridge with a bond uplink and two guests' taps; fdbhook's
hook entrypoint with real domain XML. Asserts that the uplink leaves
promiscuous mode, that frames still reach each guest through the uplink on
the right VLANs, and that VLAN membership and per-VLAN FDB entries are
exactly what the guests asked for.
"""

import json
import os
import subprocess
import sys

import pytest

from fdbhook.lab import Lab, count_marked, mac_bytes, make_frame, poll

pytestmark = pytest.mark.skipif(
    "virtme" not in open("/proc/cmdline").read() and os.environ.get("FDBHOOK_FULLKERNEL_FORCE") != "1",
    reason="only inside the virtme-ng guest kernel (tests/fullkernel/test_fullkernel.py runs it)")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAC_A, MAC_B = "52:54:00:fa:00:01", "52:54:00:fb:00:02"
WAN = "02:00:00:00:00:fe"
META_B = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'>"
          "<fdb:interface mac='%s' vlan='42' trunk='100-101'/></fdb:fdb></metadata>" % MAC_B)


def domain(name, mac, dev, metadata=""):
    return ("<domain type='kvm'><name>%s</name>%s<devices><interface type='bridge'><mac address='%s'/>"
            "<source bridge='br0'/><target dev='%s'/><alias name='net0'/></interface></devices></domain>"
            % (name, metadata, mac, dev)).encode()


def tagged(dst, src, vid, payload):
    """An 802.1Q frame: TPID 0x8100, then our experimental ethertype."""
    body = mac_bytes(dst) + mac_bytes(src) + b"\x81\x00" + vid.to_bytes(2, "big") + b"\x88\xb5" + payload
    return body + b"\x00" * max(0, 64 - len(body))


def vlan_of(frame):
    return int.from_bytes(frame[14:16], "big") & 0xFFF if frame[12:14] == b"\x81\x00" else None


@pytest.fixture(scope="module", autouse=True)
def modules():
    subprocess.run(["modprobe", "-a", "bridge", "bonding", "tun", "veth", "8021q"], check=True)


@pytest.fixture
def env(tmp_path):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
    return dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
                FDBHOOK_LOG=str(tmp_path / "log"), FDBHOOK_NO_DAEMON="1", PYTHONPATH=REPO)


def hook(lab, env, name, op, xml=b""):
    argv = lab.exec_argv([sys.executable, os.path.join(REPO, "hooks", "qemu"), name, op, "begin", "-"])
    result = subprocess.run(argv, input=xml, env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def vlans(lab, dev):
    out = lab.json("vlan", "show", "dev", dev, tool="bridge")
    entries = out[0]["vlans"] if out else []
    return sorted((v["vlan"], "PVID" in v.get("flags", []), "Egress Untagged" in v.get("flags", []))
                  for v in entries)


def entries(lab, mac):
    return sorted((e.get("vlan", 0), e["ifname"]) for e in lab.fdb(br="br0")
                  if e["mac"] == mac and e["state"] == "static")


def test_promiscuity_vlans_and_frames(env):
    with Lab(prefix="fdbfull") as lab:
        lab.add_bridge("br0")
        wan = lab.add_bond_uplink("bond0", "upl0", "upl0p", "br0", mac=WAN)
        taps = {"vnet0": lab.add_tap("vnet0", bridge="br0"), "vnet1": lab.add_tap("vnet1", bridge="br0")}
        assert lab.link("br0")["linkinfo"]["info_data"]["vlan_filtering"] == 0
        before = lab.promiscuity("bond0")
        assert before >= 1, "the uplink is promiscuous while guest ports learn and flood"

        hook(lab, env, "ga", "start", domain("ga", MAC_A, "vnet0"))
        assert lab.link("br0")["linkinfo"]["info_data"]["vlan_filtering"] == 1  # [bridge br0] vlan_filtering = on
        # The admin's uplink carries the guests' VLANs.
        for vid in (42, 100, 101):
            lab.bridge("vlan", "add", "vid", str(vid), "dev", "bond0")
        assert lab.promiscuity("bond0") >= 1  # vnet1 still learns and floods
        hook(lab, env, "gb", "start", domain("gb", MAC_B, "vnet1", META_B))
        after = lab.promiscuity("bond0")
        print("bond0 promiscuity: %d -> %d" % (before, after))
        assert after == 0

        # Exactly the VLANs asked for, and entries exactly on those VLANs (no VID 0).
        assert vlans(lab, "vnet0") == [(1, True, True)]
        assert vlans(lab, "vnet1") == [(42, True, True), (100, False, False), (101, False, False)]
        assert entries(lab, MAC_A) == [(1, "vnet0")]
        assert entries(lab, MAC_B) == [(42, "vnet1"), (100, "vnet1"), (101, "vnet1")]
        status = subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "status", "--json"]), env=env,
                                capture_output=True, timeout=60)
        bridge = json.loads(status.stdout)["bridges"][0]
        assert bridge["vlan_filtering"] is True and bridge["auto_ports"] == ["bond0"]
        # A healthy VLAN-filtering bridge is healthy: exit 0, no drift on any port.
        assert status.returncode == 0, status.stdout
        assert [p["drift"] for p in bridge["ports"] if p["domain"]] == [[], []]
        # ... and a really missing per-VLAN entry is drift: exit 4, named.
        lab.bridge("fdb", "del", MAC_B, "dev", "vnet1", "master", "vlan", "100")
        status = subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "status", "--json"]), env=env,
                                capture_output=True, timeout=60)
        assert status.returncode == 4
        drift = [p["drift"] for p in json.loads(status.stdout)["bridges"][0]["ports"] if p["name"] == "vnet1"]
        assert drift == [["static entry for %s on VLAN 100 missing" % MAC_B]]
        hook(lab, env, "gb", "reconnect", domain("gb", MAC_B, "vnet1", META_B))  # reconnect heals drift
        assert entries(lab, MAC_B) == [(42, "vnet1"), (100, "vnet1"), (101, "vnet1")]
        explained = subprocess.run(lab.exec_argv([sys.executable, "-m", "fdbhook", "explain", "br0"]), env=env,
                                   capture_output=True, text=True, timeout=60)
        print(explained.stdout)
        assert "the kernel can keep the uplink out of promiscuous mode" in explained.stdout

        # Frames still arrive through the non-promiscuous uplink, on the right VLANs.
        for end in taps.values():
            end.recv_frames(timeout=0.1)
        for _ in range(5):
            wan.send(make_frame(MAC_A, WAN, b"toA"))
            wan.send(tagged(MAC_B, WAN, 42, b"toB42"))
            wan.send(tagged(MAC_B, WAN, 100, b"toB100"))
            wan.send(make_frame("52:54:00:99:99:99", WAN, b"unknown"))
        got = {name: end.recv_frames(timeout=0.3) for name, end in taps.items()}
        assert count_marked(got["vnet0"], b"toA") == 5
        b42 = [f for f in got["vnet1"] if b"toB42" in f]
        b100 = [f for f in got["vnet1"] if b"toB100" in f]
        assert len(b42) == 5 and all(vlan_of(f) is None for f in b42)  # access VLAN leaves untagged
        assert len(b100) == 5 and all(vlan_of(f) == 100 for f in b100)  # trunk VLAN stays tagged
        assert not any(b"unknown" in f for frames in got.values() for f in frames)
        assert not any(b"toA" in f for f in got["vnet1"]) and not any(b"toB" in f for f in got["vnet0"])

        # Guest B goes away (tap deleted): no learning port is left, the uplink stays filtered.
        hook(lab, env, "gb", "stopped")
        taps.pop("vnet1").close()  # like QEMU exiting: the tap goes
        assert poll(lambda: "vnet1" not in lab.ip("-br", "link"))
        assert lab.promiscuity("bond0") == 0
        # Guest A's management goes but its port stays: it learns again, promiscuity is back.
        hook(lab, env, "ga", "stopped")
        assert lab.port_flags("vnet0")["learning"] is True
        assert lab.promiscuity("bond0") >= 1
        # The last managed guest is gone: vlan_filtering back to what it was.
        assert lab.link("br0")["linkinfo"]["info_data"]["vlan_filtering"] == 0
