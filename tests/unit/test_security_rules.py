"""Unit tier: issue 21's pure rules - port ownership, log escaping, safefile's refusals, daemon read bounds."""

import logging
import os
import socket
import stat
from dataclasses import replace

import pytest

from fdbhook import safefile
from fdbhook.daemon import RequestRefused, read_request
from fdbhook.logsetup import SafeFormatter, escape_controls
from fdbhook.model import Decision, FdbEntry, Link, Nic, libvirt_tap_mac
from fdbhook.policy import port_problem
from tests.helpers import config

MAC = "52:54:00:00:21:01"
BRIDGE = Link(name="br0", ifindex=1, kind="bridge", mac="02:b0:00:00:00:01")


def decision(port="vnet0", mac=MAC, ifindex=5):
    return Decision(nic=Nic(index=0, type="bridge", mac=mac), action="manage", reason="test", port=port,
                    ifindex=ifindex, bridge="br0", bridge_ifindex=1)


def tap(mac="06:00:00:00:00:05", kind="tun", name="vnet0", ifindex=5):
    return Link(name=name, ifindex=ifindex, kind=kind, master=1, mac=mac, is_bridge_port=True)


def problem(d=None, link=None, entries=(), holder=None, extra=(), text="[manage]\nbridges = br0\n"):
    return port_problem(d or decision(), config(text), extra, link or tap(), BRIDGE, entries, holder)


def test_libvirt_tap_mac_is_the_nic_mac_with_fe_first_or_fa_for_fe_nics():
    assert libvirt_tap_mac("52:54:00:00:21:01") == "fe:54:00:00:21:01"
    assert libvirt_tap_mac("fe:54:00:00:21:01") == "fa:54:00:00:21:01"


def test_a_tap_or_veth_of_the_guest_is_taken():
    assert problem() is None
    assert problem(link=tap(kind="veth")) is None
    foreign = FdbEntry(mac="02:ad:00:00:00:01", ifindex=5, static=True, local=False)
    assert problem(link=tap(mac="fe:54:00:00:21:01"), entries=[foreign]) is None  # libvirt made it: at once


@pytest.mark.parametrize("link, words", [
    (tap(kind="bridge"), "the bridge itself"),
    (tap(kind=None), "physical (ethernet) device, not a tap or veth"),
    (tap(kind="bond"), "bond device"),
    (tap(kind="macvlan"), "macvlan device"),
    (tap(name="eth0"), "[manage] uplinks = eth*"),
])
def test_uplinks_and_the_bridge_are_never_a_guests_port(link, words):
    d = decision(port=link.name)
    assert words in problem(d=d, link=link, text="[manage]\nbridges = br0\nuplinks = eth* bond0\n")


def test_foreign_entries_records_local_macs_and_too_many_extra_macs_are_refused():
    static = FdbEntry(mac="02:ad:00:00:00:01", ifindex=5, static=True, local=False)
    assert "carries FDB entries that are not this NIC's (02:ad:00:00:00:01)" in problem(entries=[static])
    own = FdbEntry(mac="06:00:00:00:00:05", ifindex=5, static=False, local=True)
    mine = FdbEntry(mac=MAC, ifindex=5, static=True, local=False)
    learned = FdbEntry(mac="02:00:00:00:00:99", ifindex=5, static=False, local=False)
    assert problem(entries=[own, mine, learned]) is None
    assert "belongs to domain qemu/other" in problem(holder="qemu/other")
    assert "bridge br0's own address" in problem(d=decision(mac=BRIDGE.mac))
    assert "port vnet0's own address" in problem(d=decision(mac="06:00:00:00:00:05"))
    extra = tuple("02:00:00:00:%02x:01" % i for i in range(65))
    assert "65 extra MACs, more than [manage] max_extra_macs = 64" in problem(extra=extra)
    assert problem(extra=extra[:64]) is None
    assert "max_extra_macs = 2" in problem(extra=extra[:3], text="[manage]\nmax_extra_macs = 2\n")


def test_a_tap_libvirt_made_for_another_nic_is_refused_even_without_entries_on_it():
    """A hot-plugged guest's tap locked down at its join carries no entry when nothing was predicted: another
    domain's XML naming it must not take it (nor may it take any other vnetN tap addressed for another NIC)."""
    other = tap(mac="fe:54:00:00:99:01")
    assert problem(link=other) == "port vnet0 is the tap libvirt made for another NIC (its address " \
                                  "fe:54:00:00:99:01 is not from this NIC's MAC): refused"
    assert problem(link=tap(mac="fe:61:79:29:2f:d7")) is None  # the kernel's random address, not libvirt's
    assert problem(d=decision(port="mytap"), link=tap(mac="fe:54:00:00:99:01", name="mytap")) is None  # admin tap
    assert problem(link=tap(mac="fe:54:00:00:99:01", kind="veth")) is None  # lxc: the host veth's MAC is random
    changed = replace(decision(), nic=Nic(index=0, type="bridge", mac="52:54:00:00:99:02",
                                          config_mac="52:54:00:00:99:01"))
    assert problem(d=changed, link=other) is None  # the guest changed its MAC: the tap is its config MAC's


def test_control_characters_are_escaped_in_every_line_but_a_traceback_keeps_its_lines():
    assert escape_controls("a\nfdbhook[1]: forged\r\x1b[2J\u2028") == "a\\x0afdbhook[1]: forged\\x0d\\x1b[2J\\u2028"
    record = logging.LogRecord("fdbhook", logging.ERROR, __file__, 1, "%s/%s: x", ("qemu", "a\nb"), None)
    assert SafeFormatter("fdbhook: %(message)s").format(record) == "fdbhook: qemu/a\\x0ab: x"


def test_safefile_refuses_links_and_shared_directories(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(safefile.UnsafePath, match="symlink"):
        safefile.write_file(str(tmp_path / "link" / "f"), b"x")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(safefile.UnsafePath, match="writable by group or others"):
        safefile.write_file(str(shared / "f"), b"x")
    assert os.listdir(real) == [] and os.listdir(shared) == []
    safefile.write_file(str(tmp_path / "new" / "sub" / "f"), b"data", mode=0o640)
    st = os.stat(tmp_path / "new" / "sub" / "f")
    assert stat.S_IMODE(st.st_mode) == 0o640 and stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
    assert (tmp_path / "new" / "sub" / "f").read_bytes() == b"data"
    assert os.listdir(tmp_path / "new" / "sub") == ["f"]  # no temp file left


def test_safefile_log_append_refuses_a_link_and_a_hard_link(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / "log").symlink_to(target)
    with pytest.raises(safefile.UnsafePath, match="symlink"):
        safefile.open_append(str(tmp_path / "log"))
    os.link(target, tmp_path / "hard")
    with pytest.raises(safefile.UnsafePath, match="hard links"):
        safefile.open_append(str(tmp_path / "hard"))
    fd = safefile.open_append(str(tmp_path / "fresh.log"))
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.log").st_mode) == 0o640
    assert target.read_bytes() == b"keep"


def test_daemon_reads_a_request_within_its_size_limit_only():
    a, b = socket.socketpair()
    try:
        b.sendall(b"x" * 100)
        b.shutdown(socket.SHUT_WR)
        assert read_request(a, 1000, 30.0) == b"x" * 100
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    try:
        b.sendall(b"x" * 5000)
        with pytest.raises(RequestRefused, match="over 1000 bytes"):
            read_request(a, 1000, 30.0)
    finally:
        a.close()
        b.close()
