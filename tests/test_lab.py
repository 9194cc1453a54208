"""The throwaway lab works on this kernel, and what the kernel does in it.

Root tier: every kernel test runs in its own network namespace and checks
results through iproute2's JSON, never through fdbhook's netlink code.
"""

import os
import subprocess
import threading
import uuid

import pytest

from fdbhook.lab import (
    ETH_P_EXPERIMENTAL,
    PORT_FLAG_KEYS,
    Lab,
    LabError,
    count_marked,
    in_netns,
    mac_bytes,
    make_frame,
    parse_frame,
    poll,
)

needs_tun = pytest.mark.skipif(
    not os.path.exists("/dev/net/tun"), reason="/dev/net/tun is absent (no tun/tap)"
)

GUEST1 = "52:54:00:aa:00:01"
GUEST2 = "52:54:00:aa:00:02"
UNKNOWN = "52:54:00:aa:00:99"
OUTSIDE = "02:00:00:bb:00:01"  # a host "out there", behind the uplink
BROADCAST = "ff:ff:ff:ff:ff:ff"


@pytest.fixture
def marker():
    """Unique payload prefix: only frames this test sent are ever counted."""
    return b"fdbh" + uuid.uuid4().bytes


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def netns_names():
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


# ---------------------------------------------------------------------------
# Pure helpers (no root needed)


def test_make_frame_pads_to_minimum_and_parses_back():
    frame = make_frame(GUEST1, OUTSIDE, b"hello")
    assert len(frame) == 60
    dst, src, ethertype, payload = parse_frame(frame)
    assert (dst, src, ethertype) == (GUEST1, OUTSIDE, ETH_P_EXPERIMENTAL)
    assert payload.startswith(b"hello") and len(payload) == 46
    big = make_frame(GUEST1, OUTSIDE, b"x" * 100)
    assert len(big) == 114


def test_count_marked_ignores_other_ethertypes_and_markers():
    frames = [
        make_frame(GUEST1, OUTSIDE, b"M1-a"),
        make_frame(GUEST1, OUTSIDE, b"M1-b"),
        make_frame(GUEST1, OUTSIDE, b"M2"),
        make_frame(GUEST1, OUTSIDE, b"M1", ethertype=0x86DD),
        b"\x01\x02",
    ]
    assert count_marked(frames, b"M1") == 2


def test_mac_bytes_rejects_garbage():
    assert mac_bytes("52:54:00:AA:00:01") == bytes([0x52, 0x54, 0, 0xAA, 0, 1])
    with pytest.raises(ValueError):
        mac_bytes("52:54:00")
    with pytest.raises(ValueError):
        parse_frame(b"short")


def test_poll_true_when_predicate_holds_false_at_deadline():
    calls = []
    assert poll(lambda: calls.append(1) or len(calls) >= 3, timeout=1, interval=0)
    assert not poll(lambda: False, timeout=0.05)


# ---------------------------------------------------------------------------
# Kernel tier


def make_topology(lab):
    """br0 with two guest taps and a veth uplink; drain the set-up noise."""
    lab.add_bridge("br0")
    tap1 = lab.add_tap("tap1", bridge="br0")
    tap2 = lab.add_tap("tap2", bridge="br0")
    uplink = lab.add_veth("up0", "up0p", bridge="br0")
    for endpoint in (tap1, tap2, uplink):
        endpoint.drain()
    return tap1, tap2, uplink


def delivered(endpoints, frame, sender, marker):
    """Send FRAME from SENDER; return {endpoint name: marked frames received}."""
    sender.send(frame)
    return {
        ep.name: count_marked(ep.recv_frames(timeout=0.2), marker)
        for ep in endpoints
    }


def manage_port(lab, dev, mac):
    """What fdbhook does to a guest port, spelled with iproute2."""
    lab.ip("link", "set", "dev", dev, "type", "bridge_slave", "learning", "off")
    lab.bridge("fdb", "replace", mac, "dev", dev, "master", "static")
    lab.ip("link", "set", "dev", dev, "type", "bridge_slave", "flood", "off")


@pytest.mark.root
@needs_tun
def test_in_netns_switches_only_the_thread_and_back(lab):
    def netns_inode(path):
        return os.stat(path).st_ino

    main_before = netns_inode("/proc/self/ns/net")
    fds = open_fds()
    seen = {}

    def worker():
        seen["before"] = netns_inode("/proc/thread-self/ns/net")
        with in_netns(lab.ns):
            seen["inside"] = netns_inode("/proc/thread-self/ns/net")
            # /proc/self is the main thread: it must not have moved.
            seen["main_inside"] = netns_inode("/proc/self/ns/net")
        seen["after"] = netns_inode("/proc/thread-self/ns/net")

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["inside"] == netns_inode("/run/netns/" + lab.ns)
    assert seen["before"] == seen["after"] == main_before
    assert seen["main_inside"] == main_before != seen["inside"]
    assert open_fds() == fds


@pytest.mark.root
@needs_tun
def test_unknown_unicast_floods_then_static_entry_steers(lab, marker):
    tap1, tap2, uplink = make_topology(lab)
    everyone = (tap1, tap2, uplink)

    # Baseline: a MAC the bridge does not know is flooded to every port,
    # and the uplink never sees its own frame come back.
    got = delivered(everyone, make_frame(GUEST1, OUTSIDE, marker), uplink, marker)
    assert got == {"tap1": 1, "tap2": 1, "up0p": 0}

    manage_port(lab, "tap1", GUEST1)
    manage_port(lab, "tap2", GUEST2)

    flags = lab.port_flags("tap1")
    assert (flags["learning"], flags["flood"], flags["master"]) == (False, False, "br0")
    entries = [e for e in lab.fdb(dev="tap1") if e["mac"] == GUEST1]
    assert len(entries) == 1
    assert entries[0]["state"] == "static"
    assert entries[0]["master"] == "br0"
    assert entries[0]["ifname"] == "tap1"
    assert "self" not in entries[0]["flags"]

    got = delivered(everyone, make_frame(GUEST1, OUTSIDE, marker), uplink, marker)
    assert got == {"tap1": 1, "tap2": 0, "up0p": 0}
    got = delivered(everyone, make_frame(GUEST2, OUTSIDE, marker), uplink, marker)
    assert got == {"tap1": 0, "tap2": 1, "up0p": 0}
    # Unknown unicast now reaches no guest port at all.
    got = delivered(everyone, make_frame(UNKNOWN, OUTSIDE, marker), uplink, marker)
    assert got == {"tap1": 0, "tap2": 0, "up0p": 0}
    # "flood off" is unicast only; broadcast still goes everywhere.
    got = delivered(everyone, make_frame(BROADCAST, OUTSIDE, marker), uplink, marker)
    assert got == {"tap1": 1, "tap2": 1, "up0p": 0}
    # Guest to outside: the uplink is still an ordinary learning+flooding port.
    got = delivered(everyone, make_frame(OUTSIDE, GUEST1, marker), tap1, marker)
    assert got == {"tap1": 0, "tap2": 0, "up0p": 1}


@pytest.mark.root
@needs_tun
def test_learning_makes_dynamic_entries_only_while_on(lab, marker):
    tap1, tap2, uplink = make_topology(lab)
    lab.ip("link", "set", "dev", "tap2", "type", "bridge_slave", "learning", "off")

    tap1.send(make_frame(BROADCAST, GUEST1, marker))
    tap2.send(make_frame(BROADCAST, GUEST2, marker))
    assert count_marked(uplink.recv_frames(timeout=0.2), marker) == 2

    by_mac = {e["mac"]: e for e in lab.fdb(br="br0")}
    # A learned entry has no NUD state in iproute2's JSON at all.
    assert by_mac[GUEST1]["ifname"] == "tap1"
    assert by_mac[GUEST1]["state"] == ""
    assert GUEST2 not in by_mac


@pytest.mark.root
@needs_tun
def test_fdb_entry_kinds_as_iproute2_shows_them(lab, marker):
    """static moves on a learning port, sticky stays, no-state is LOCAL."""
    tap1, tap2, uplink = make_topology(lab)
    moving, sticky, local = GUEST1, GUEST2, "52:54:00:aa:00:03"
    lab.bridge("fdb", "replace", moving, "dev", "tap1", "master", "static")
    lab.bridge("fdb", "replace", sticky, "dev", "tap1", "master", "static", "sticky")
    # No state keyword: iproute2 sends NUD_PERMANENT, i.e. a LOCAL entry.
    lab.bridge("fdb", "replace", local, "dev", "tap1", "master")
    lab.ip("link", "set", "dev", "tap1", "type", "bridge_slave", "learning", "off")
    lab.ip("link", "set", "dev", "tap1", "type", "bridge_slave", "flood", "off")

    by_mac = {e["mac"]: e for e in lab.fdb(br="br0")}
    assert (by_mac[moving]["state"], by_mac[moving]["flags"]) == ("static", [])
    assert (by_mac[sticky]["state"], by_mac[sticky]["flags"]) == ("static", ["sticky"])
    assert (by_mac[local]["state"], by_mac[local]["flags"]) == ("permanent", [])

    # The guest MACs show up as source on the (learning) uplink.
    for mac in (moving, sticky, local):
        uplink.send(make_frame(BROADCAST, mac, marker))
    assert poll(
        lambda: any(e["mac"] == moving for e in lab.fdb(dev="up0")), timeout=2
    )
    by_mac = {e["mac"]: e for e in lab.fdb(br="br0")}
    assert by_mac[moving]["ifname"] == "up0"  # hijacked, still "static"
    assert by_mac[moving]["state"] == "static"
    assert by_mac[sticky]["ifname"] == "tap1"
    assert by_mac[local]["ifname"] == "tap1"

    for endpoint in (tap1, tap2, uplink):
        endpoint.drain()
    for mac in (moving, sticky, local):
        uplink.send(make_frame(mac, OUTSIDE, marker + mac_bytes(mac)))
    frames = tap1.recv_frames(timeout=0.2)
    assert count_marked(frames, marker + mac_bytes(sticky)) == 1
    assert count_marked(frames, marker + mac_bytes(moving)) == 0
    # LOCAL: delivered to the host stack, never out of the tap.
    assert count_marked(frames, marker + mac_bytes(local)) == 0


@pytest.mark.root
@needs_tun
def test_port_flags_reader_and_promiscuity(lab):
    tap1, _, _ = make_topology(lab)
    flags = lab.port_flags("tap1")
    assert set(PORT_FLAG_KEYS) <= set(flags)
    assert flags["state"] == "forwarding"
    assert flags["learning"] is True and flags["flood"] is True
    lab.ip(
        "link", "set", "dev", "tap1", "type", "bridge_slave",
        "learning", "off", "flood", "off", "mcast_flood", "off",
        "bcast_flood", "off", "neigh_suppress", "on", "isolated", "on",
        "locked", "on",
    )
    flags = lab.port_flags("tap1")
    assert {k: flags[k] for k in PORT_FLAG_KEYS} == {
        "state": "forwarding",
        "learning": False,
        "flood": False,
        "mcast_flood": False,
        "bcast_flood": False,
        "neigh_suppress": True,
        "isolated": True,
        "locked": True,
    }
    not_a_port = lab.port_flags("br0")
    assert not_a_port["master"] is None and not_a_port["learning"] is None
    # Bridge ports are promiscuous; without vlan_filtering the kernel never
    # clears it, not even with every guest port non-auto.
    assert lab.promiscuity("tap1") == 1
    assert lab.promiscuity("up0") == 1
    assert lab.promiscuity("br0") == 0
    assert tap1.mac == lab.link("tap1")["address"]


@pytest.mark.root
@needs_tun
def test_tap_has_carrier_while_held_and_vanishes_with_its_entries(lab):
    lab.add_bridge("br0")
    tap = lab.add_tap("tap1", bridge="br0", mac="fe:54:00:aa:00:01")
    link = lab.link("tap1")
    assert "LOWER_UP" in link["flags"] and "NO-CARRIER" not in link["flags"]
    assert tap.mac == "fe:54:00:aa:00:01"
    lab.bridge("fdb", "replace", GUEST1, "dev", "tap1", "master", "static")

    tap.close()  # what QEMU exiting does

    def gone():
        return all(l["ifname"] != "tap1" for l in lab.json("link", "show"))

    assert poll(gone)
    assert all(e["mac"] != GUEST1 for e in lab.fdb(br="br0"))


@pytest.mark.root
@needs_tun
def test_lab_rejects_bad_commands_with_stderr(lab):
    with pytest.raises(LabError, match="nosuchdev"):
        lab.ip("link", "set", "dev", "nosuchdev", "up")


@pytest.mark.root
@needs_tun
def test_namespace_and_everything_in_it_vanish_even_if_body_raises():
    fds = open_fds()
    host_end = "fdbhx%d" % (os.getpid() % 100000)
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            ns = lab.ns
            assert ns in netns_names()
            make_topology(lab)
            # One end in the host namespace: it can only disappear if the lab
            # namespace (holding its peer) is really destroyed.
            lab.add_veth_pair_raw(host_end, host_end + "p")
            lab.ip("link", "set", "dev", host_end, "netns", str(os.getpid()))
            raise RuntimeError("boom")
    try:
        assert ns not in netns_names()
        assert open_fds() == fds

        def host_end_gone():
            return not os.path.exists("/sys/class/net/" + host_end)

        assert poll(host_end_gone), "namespace was not destroyed"
    finally:
        if os.path.exists("/sys/class/net/" + host_end):
            subprocess.run(["ip", "link", "del", host_end], check=False)


@pytest.mark.root
@needs_tun
def test_no_fd_leak_over_many_labs():
    fds = open_fds()
    for _ in range(3):
        with Lab() as lab:
            make_topology(lab)
            lab.add_veth("g1", "g1p", bridge="br0")
    assert open_fds() == fds
