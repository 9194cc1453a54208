"""Kernel tier: the hook entrypoint as a subprocess against real bridges.

Every test builds its own network namespace (tests/conftest.py ``lab``),
runs ``python -m fdbhook hook ...`` inside it, and checks the result with
iproute2's JSON (lab.py) and with pyroute2 directly - never with fdbhook's
own netlink code. Traffic is raw Ethernet frames with ethertype 0x88B5.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from fdbhook.lab import Lab, count_marked, make_frame
from tests.helpers import bridge_nic, domain_xml, network_nic

pytestmark = pytest.mark.root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAN = "02:00:00:00:00:fe"


@pytest.fixture
def env(tmp_path):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\nnetworks = isolated*\n")
    nets = tmp_path / "networks"
    nets.mkdir()
    (nets / "isolated1.xml").write_text(
        "<networkstatus><network><name>isolated1</name><bridge name='br0'/></network></networkstatus>")
    return dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
                FDBHOOK_LOG=str(tmp_path / "log"), FDBHOOK_LIBVIRT_NETWORK_DIRS=str(nets), PYTHONPATH=REPO)


def hook(lab, env, driver, name, op, xml=b""):
    argv = lab.exec_argv([sys.executable, "-m", "fdbhook", "hook", driver, name, op, "begin", "-"])
    return subprocess.run(argv, input=xml, env=env, capture_output=True, timeout=60)


def cli(lab, env, *args, xml=None):
    argv = lab.exec_argv([sys.executable, "-m", "fdbhook", *args])
    return subprocess.run(argv, input=xml, env=env, capture_output=True, timeout=60)


def static_entries(lab, br="br0"):
    return {e["mac"]: e for e in lab.fdb(br=br) if e["state"] == "static"}


def pyroute2_view(lab, port):
    """learning, flood and static master entries of one port, read with pyroute2 itself."""
    from pyroute2 import NetNS

    ns = NetNS(lab.ns)
    try:
        idx = ns.link_lookup(ifname=port)[0]
        info = ns.link("get", index=idx)[0].get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_SLAVE_DATA")
        macs = sorted(m.get_attr("NDA_LLADDR") for m in ns.fdb("dump", ifindex=idx)
                      if m["ifindex"] == idx and m["state"] == 0x40 and m.get_attr("NDA_MASTER"))
        return (bool(info.get_attr("IFLA_BRPORT_LEARNING")), bool(info.get_attr("IFLA_BRPORT_UNICAST_FLOOD")),
                macs)
    finally:
        ns.close()


CONFIG_KEYS = ("learning", "flood", "mcast_flood", "bcast_flood", "neigh_suppress", "isolated", "locked",
               "hairpin", "proxy_arp", "priority", "cost", "guard", "root_block", "fastleave", "master")


def snapshot(lab, dev):
    """A port's configuration (no timers) and its FDB entries."""
    flags = lab.port_flags(dev)
    flags = {key: flags.get(key) for key in CONFIG_KEYS}
    return flags, sorted(json.dumps(e, sort_keys=True) for e in lab.fdb(dev=dev))


ETH_NIC = "<interface type='ethernet'><mac address='52:54:00:00:00:05'/><target dev='tap5'/></interface>"
OPTED_OUT = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'><fdb:interface mac='52:54:00:00:00:0a' mode='off'/>"
             "</fdb:fdb></metadata>")


def three_nic_domain():
    return domain_xml([bridge_nic(dev="vnet0"), network_nic(dev="vnet1"), ETH_NIC,
                       bridge_nic(mac="52:54:00:00:00:0a", dev="tapx", alias="net9"),
                       bridge_nic(mac="52:54:00:00:00:0b", bridge="brother", dev="tapu", alias="net8")],
                      metadata=OPTED_OUT)


def build(lab):
    lab.add_bridge("br0")
    lab.add_bridge("brother")
    wan = lab.add_veth("uplink", "wan", bridge="br0", mac=WAN)
    taps = {name: lab.add_tap(name, bridge="br0") for name in ("vnet0", "vnet1", "tap5", "tapx")}
    taps["tapu"] = lab.add_tap("tapu", bridge="brother")
    return wan, taps


def test_start_manages_every_bridged_type_and_nothing_else(lab, env):
    build(lab)
    foreign = {dev: snapshot(lab, dev) for dev in ("uplink", "tapx", "tapu")}
    result = hook(lab, env, "qemu", "t1", "start", three_nic_domain())
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""
    entries = static_entries(lab)
    for port, mac in (("vnet0", "52:54:00:00:00:01"), ("vnet1", "52:54:00:00:00:02"),
                      ("tap5", "52:54:00:00:00:05")):
        flags = lab.port_flags(port)
        assert (flags["learning"], flags["flood"]) == (False, False), port
        assert entries[mac]["ifname"] == port and "sticky" in entries[mac]["flags"]
        assert pyroute2_view(lab, port) == (False, False, [mac])
    for dev, before in foreign.items():
        assert snapshot(lab, dev) == before, dev
    log = open(os.path.join(env["FDBHOOK_LOG"])).read()
    assert "qemu/t1: net0 (52:54:00:00:00:01) vnet0 on br0: fdb static sticky added" in log
    assert "NIC opted out" in log and "brother not in [manage]" in log

    stop = hook(lab, env, "qemu", "t1", "stopped")
    assert stop.returncode == 0 and stop.stderr == b""
    assert static_entries(lab) == {}
    for port in ("vnet0", "vnet1", "tap5"):
        assert pyroute2_view(lab, port)[:2] == (True, True)
    for dev, before in foreign.items():
        assert snapshot(lab, dev) == before, dev
    assert os.listdir(os.path.join(env["FDBHOOK_STATE_DIR"], "domains")) == []
    assert hook(lab, env, "qemu", "t1", "release").returncode == 0


def test_data_path_with_raw_frames(lab, env):
    lab.add_bridge("br0")
    wan = lab.add_veth("uplink", "wan", bridge="br0", mac=WAN)
    guests = {"vnet%d" % i: lab.add_tap("vnet%d" % i, bridge="br0") for i in range(3)}
    macs = {"vnet%d" % i: "52:54:00:00:01:%02x" % i for i in range(3)}
    xml = domain_xml([bridge_nic(mac=macs[p], dev=p, alias="net" + p[-1]) for p in guests])

    def settle():
        for end in list(guests.values()) + [wan]:
            end.recv_frames(timeout=0.1)

    def counts(marker):
        return {p: count_marked(end.recv_frames(timeout=0.2), marker) for p, end in guests.items()}

    for port, end in guests.items():
        end.send(make_frame("ff:ff:ff:ff:ff:ff", macs[port], b"hello"))
    settle()
    for i in range(10):
        wan.send(make_frame("52:54:00:99:99:99", WAN, b"unk0"))
    assert counts(b"unk0") == {p: 10 for p in guests}  # baseline: flooded everywhere

    assert hook(lab, env, "qemu", "t1", "start", xml).returncode == 0
    for i in range(10):
        wan.send(make_frame("52:54:00:99:99:99", WAN, b"unk1"))
    assert counts(b"unk1") == {p: 0 for p in guests}

    for port in guests:
        for i in range(5):
            wan.send(make_frame(macs[port], WAN, b"to" + port.encode()))
        got = counts(b"to" + port.encode())
        assert got == {p: (5 if p == port else 0) for p in guests}, port

    # vnet2 forges vnet0's MAC; vnet0's traffic must still go to vnet0 only.
    guests["vnet2"].send(make_frame("ff:ff:ff:ff:ff:ff", macs["vnet0"], b"forge"))
    settle()
    for i in range(5):
        wan.send(make_frame(macs["vnet0"], WAN, b"victim"))
    assert counts(b"victim") == {"vnet0": 5, "vnet1": 0, "vnet2": 0}
    # The uplink forging a guest's MAC cannot move a sticky entry either.
    wan.send(make_frame("ff:ff:ff:ff:ff:ff", macs["vnet1"], b"forge2"))
    settle()
    assert static_entries(lab)[macs["vnet1"]]["ifname"] == "vnet1"

    assert hook(lab, env, "qemu", "t1", "stopped").returncode == 0
    for i in range(10):
        wan.send(make_frame("52:54:00:99:99:99", WAN, b"unk2"))
    assert counts(b"unk2") == {p: 10 for p in guests}  # flooding is back


def test_second_run_is_a_no_op_and_reconnect_heals(lab, env):
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    xml = domain_xml([bridge_nic()])
    assert hook(lab, env, "qemu", "t1", "start", xml).returncode == 0
    assert hook(lab, env, "qemu", "t1", "started", xml).returncode == 0
    log = open(env["FDBHOOK_LOG"]).read().splitlines()
    assert log[-1].endswith("vnet0 on br0: already in place")
    lab.bridge("link", "set", "dev", "vnet0", "learning", "on")
    lab.bridge("fdb", "del", "52:54:00:00:00:01", "dev", "vnet0", "master")
    assert hook(lab, env, "qemu", "t1", "reconnect", xml).returncode == 0
    assert pyroute2_view(lab, "vnet0") == (False, False, ["52:54:00:00:00:01"])
    assert "fdb static sticky added, learning off, learned entries flushed" in open(env["FDBHOOK_LOG"]).read()
    # teardown still restores the flags from before the *first* start
    assert hook(lab, env, "qemu", "t1", "stopped").returncode == 0
    assert pyroute2_view(lab, "vnet0") == (True, True, [])


def test_failure_exits_1_and_changes_nothing(lab, env):
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    before = snapshot(lab, "vnet0")
    xml = domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet404", alias="net1")])
    result = hook(lab, env, "qemu", "t1", "start", xml)
    assert result.returncode == 1
    assert result.stderr == b"fdbhook: domain t1: NIC net1 (52:54:00:00:00:02): port vnet404 does not exist\n"
    assert snapshot(lab, "vnet0") == before
    bad = hook(lab, env, "qemu", "t1", "start", b"<domain><name>t1</name><devices><interface type='bridge'>"
               b"<source bridge='br0'/")  # names a managed bridge: ours, and refused
    assert bad.returncode == 1 and bad.stderr.count(b"\n") == 1 and b"Traceback" not in bad.stderr
    assert snapshot(lab, "vnet0") == before
    # Failing teardown input never fails libvirt's stop path.
    assert hook(lab, env, "qemu", "t1", "stopped", b"\x00garbage").returncode == 0


def test_foreign_static_entry_is_never_moved(lab, env):
    lab.add_bridge("br0")
    lab.add_veth("uplink", "wan", bridge="br0", mac=WAN)
    lab.add_tap("vnet0", bridge="br0")
    lab.bridge("fdb", "add", "52:54:00:00:00:01", "dev", "uplink", "master", "static")
    result = hook(lab, env, "qemu", "t1", "start", domain_xml([bridge_nic()]))
    assert result.returncode == 1 and b"not ours" in result.stderr
    assert static_entries(lab)["52:54:00:00:00:01"]["ifname"] == "uplink"
    assert lab.port_flags("vnet0")["learning"] is True


def test_lxc_port_is_found_through_the_veth_peer(lab, env):
    lab.add_bridge("br0")
    lab.add_veth_pair_raw("vnet20", "vnet21")  # host end, container end (libvirt's naming)
    lab.ip("link", "set", "vnet20", "master", "br0")
    xml = domain_xml(["<interface type='bridge'><mac address='52:54:00:00:00:0c'/><source bridge='br0'/>"
                      "<guest dev='eth0' actual='vnet21'/></interface>"], name="ct1", dtype="lxc")
    assert hook(lab, env, "lxc", "ct1", "start", xml).returncode == 0
    assert pyroute2_view(lab, "vnet20") == (False, False, ["52:54:00:00:00:0c"])
    with Lab(prefix="fdbct") as container:
        # libvirt moves the container end into the container before 'started'.
        lab.ip("link", "set", "vnet21", "netns", container.ns)
        result = hook(lab, env, "lxc", "ct1", "started", xml)
        assert result.returncode == 0, result.stderr
        assert open(env["FDBHOOK_LOG"]).read().splitlines()[-1].endswith("vnet20 on br0: already in place")
        assert hook(lab, env, "lxc", "ct1", "release").returncode == 0
        assert pyroute2_view(lab, "vnet20") == (True, True, [])


def test_sixteen_concurrent_hooks_on_one_bridge(lab, env):
    lab.add_bridge("br0")
    names = ["d%02d" % i for i in range(16)]
    for i, name in enumerate(names):
        lab.add_tap("vnet%d" % i, bridge="br0")
    xmls = {name: domain_xml([bridge_nic(mac="52:54:00:00:02:%02x" % i, dev="vnet%d" % i)], name=name)
            for i, name in enumerate(names)}

    def run_all(op):
        procs = []
        for name in names:
            argv = lab.exec_argv([sys.executable, "-m", "fdbhook", "hook", "qemu", name, op, "begin", "-"])
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            procs.append(proc)
        for name, proc in zip(names, procs):
            _, err = proc.communicate(xmls[name] if op == "start" else b"", timeout=120)
            assert proc.returncode == 0, (name, err)

    run_all("start")
    entries = static_entries(lab)
    state = os.path.join(env["FDBHOOK_STATE_DIR"], "domains")
    for i, name in enumerate(names):
        mac = "52:54:00:00:02:%02x" % i
        assert entries[mac]["ifname"] == "vnet%d" % i
        assert lab.port_flags("vnet%d" % i)["learning"] is False
        with open(os.path.join(state, "qemu-%s.json" % name)) as handle:
            record = json.load(handle)
        assert record["domain"] == name and [n["mac"] for n in record["nics"]] == [mac]
    run_all("stopped")
    assert static_entries(lab) == {} and os.listdir(state) == []
    assert all(lab.port_flags("vnet%d" % i)["learning"] for i in range(16))


def test_cli_dry_run_status_and_teardown(lab, env, tmp_path):
    lab.add_bridge("br0")
    lab.add_veth("uplink", "wan", bridge="br0")
    lab.add_tap("vnet0", bridge="br0")
    xml_file = tmp_path / "t1.xml"
    xml_file.write_bytes(domain_xml([bridge_nic()]))
    dry = cli(lab, env, "apply", "--xml", str(xml_file), "--dry-run")
    assert dry.returncode == 0
    assert b"bridge fdb replace 52:54:00:00:00:01 dev vnet0 master static sticky" in dry.stdout
    assert lab.port_flags("vnet0")["learning"] is True and static_entries(lab) == {}

    assert cli(lab, env, "apply", "--xml", str(xml_file)).returncode == 0
    status = cli(lab, env, "status", "--json")
    assert status.returncode == 0, status.stdout
    data = json.loads(status.stdout)
    (bridge,) = data["bridges"]
    ports = {p["name"]: p for p in bridge["ports"]}
    assert ports["vnet0"]["domain"] == "qemu/t1" and ports["vnet0"]["static_entry"] is True
    assert ports["uplink"]["domain"] is None
    assert bridge["auto_ports"] == ["uplink"]
    assert any("promiscuity cannot be cleared" in s or "can keep" in s for s in bridge["explain"])

    explained = cli(lab, env, "explain", "br0")
    assert explained.returncode == 0 and b"still learning or flooding: uplink" in explained.stdout
    assert cli(lab, env, "explain", "nosuchbr").returncode == 2

    lab.bridge("link", "set", "dev", "vnet0", "flood", "on")
    drift = cli(lab, env, "status")
    assert drift.returncode == 4 and b"DRIFT: flood on" in drift.stdout

    assert cli(lab, env, "teardown", "t1").returncode == 0
    assert lab.port_flags("vnet0")["flood"] is True and static_entries(lab) == {}


def test_demo_shows_zero_leaks():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fdbhook", "demo", "--frames", "10"], capture_output=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    out = proc.stdout.decode()
    assert proc.returncode == 0, out + proc.stderr.decode()
    assert "result: 0 of 30 unknown-unicast frames reached managed guests (unmanaged baseline: 30 of 30)" in out
    assert time.monotonic() - start < 120


def test_vlan_filtering_policy_on_a_kernel_without_it(lab, env, tmp_path):
    """This kernel lacks CONFIG_BRIDGE_VLAN_FILTERING: say so once, keep managing ports."""
    conf = tmp_path / "vlan.conf"
    conf.write_text("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n")
    env = dict(env, FDBHOOK_CONF=str(conf))
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    xml = domain_xml([bridge_nic()])
    assert hook(lab, env, "qemu", "t1", "start", xml).returncode == 0
    assert hook(lab, env, "qemu", "t1", "reconnect", xml).returncode == 0
    log = open(env["FDBHOOK_LOG"]).read()
    if lab.link("br0")["linkinfo"]["info_data"].get("vlan_filtering") == 1:
        pytest.skip("this kernel has VLAN filtering; covered by the full-kernel tier")
    assert log.count("CONFIG_BRIDGE_VLAN_FILTERING") == 1
    assert pyroute2_view(lab, "vnet0") == (False, False, ["52:54:00:00:00:01"])
    status = cli(lab, env, "status", "--json")
    (bridge,) = json.loads(status.stdout)["bridges"]
    assert bridge["vlan_filtering_supported"] is False
    assert any("no bridge VLAN filtering" in s for s in bridge["explain"])
