"""System tier: fdbhook as libvirt runs it, end to end.

A real libvirtd (Debian 12: libvirt 9.0) runs the hooks install.sh put into
/etc/libvirt/hooks; guests are diskless ``<domain type='qemu'>`` (64 MiB,
TCG is fine, no guest OS, no option ROMs) and LXC containers running
/bin/sh. Bridges ``fdbe2e-br0`` (managed) and ``fdbe2e-um0`` (not managed)
are made with ip(8); the libvirt network ``fdbe2e-net`` (managed by name) is
isolated, without ``<ip>``. Results are read with ``ip -d -j``,
``bridge -j``, virsh and the files under /run/fdbhook - the hooks run in
libvirtd, so nothing here calls fdbhook's code except ``fdbhook replay``.
No IP traffic: no addresses anywhere and IPv6 off on every new link (see
conftest.py).
"""

import os
import subprocess
import time

import pytest

from tests.system import libvirt_env as E
from tests.system.conftest import FOREIGN_HOOK_MARK, install_hooks

pytestmark = [pytest.mark.libvirt, pytest.mark.root]

DRIVERS = ["qemu", "lxc"]


def mac(test, n):
    return "52:54:00:e2:%02x:%02x" % (test, n)


@pytest.fixture(params=DRIVERS)
def driver(request, lv):
    if request.param == "lxc":
        request.getfixturevalue("lxc_ok")
    return request.param


# --- assertions ---------------------------------------------------------------

def assert_managed(dev, bridge, addr):
    port = E.port(dev)
    assert port is not None, "port %s does not exist" % dev
    assert port["master"] == bridge, port
    assert port["learning"] is False and port["flood"] is False, "%s: %s" % (dev, port)
    entries = E.static_entries(bridge, addr)
    assert [e["ifname"] for e in entries] == [dev], "static entries for %s: %s" % (addr, entries)
    assert "sticky" in entries[0].get("flags", []), entries


def assert_untouched(dev, bridge, addr):
    port = E.port(dev)
    assert port is not None, "port %s does not exist" % dev
    assert port["master"] == bridge, port
    assert port["learning"] is True and port["flood"] is True, "%s: %s" % (dev, port)
    assert not [e for e in E.static_entries(bridge, addr) if e["ifname"] == dev], E.fdb(bridge)


def assert_no_entries(*addrs):
    for bridge in (E.BR, E.NET_BR, E.UM):
        left = [e for e in E.static_entries(bridge) if e["mac"] in addrs]
        assert not left, "entries left on %s: %s" % (bridge, left)


def record_macs(driver, name):
    rec = E.record(driver, name)
    return None if rec is None else sorted(n["mac"] for n in rec["nics"])


def hook_line(stderr):
    """fdbhook's line in virsh's error (libvirt appends the hook's stderr)."""
    lines = [line for line in stderr.splitlines() if "fdbhook:" in line]
    assert len(lines) == 1, stderr
    line = lines[0]
    return line[line.index("fdbhook:"):]


def start_all(driver, names):
    """Start the domains at the same time; return their CompletedProcess-like results."""
    uri = E.URIS[driver]
    procs = [subprocess.Popen(["virsh", "-q", "-c", uri, "start", n], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=E.CLEAN_ENV) for n in names]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        out.append((p.returncode, stdout, stderr))
    return out


# --- the scenarios ---------------------------------------------------------------

def test_nics_managed_then_restored(guests, driver, request):
    """bridge, network and (qemu) ethernet NICs on managed bridges; one NIC on an unmanaged bridge."""
    name = "%s-%s-nics" % (E.PFX, driver)
    m_br, m_net, m_eth, m_um = (mac(1, n) for n in range(1, 5))
    nics = [E.nic_bridge(m_br, E.BR, driver), E.nic_network(m_net, E.NET, driver),
            E.nic_bridge(m_um, E.UM, driver)]
    tap = None
    if driver == "qemu":
        tap = request.getfixturevalue("ethernet_tap")
        nics.append(E.nic_ethernet(m_eth, tap))
        assert_untouched(tap, E.BR, m_eth)
        tap_index = E.port(tap)["ifindex"]
    guests.define(driver, name, nics)

    guests.start(driver, name)
    uri = E.URIS[driver]
    dev = {m: E.dev_of(uri, name, m) for m in (m_br, m_net, m_um)}
    assert_managed(dev[m_br], E.BR, m_br)
    assert_managed(dev[m_net], E.NET_BR, m_net)
    assert_untouched(dev[m_um], E.UM, m_um)
    managed = [m_br, m_net]
    if tap:
        assert E.dev_of(uri, name, m_eth) == tap
        assert_managed(tap, E.BR, m_eth)
        managed.append(m_eth)
    assert record_macs(driver, name) == sorted(managed)
    for d in list(dev.values()) + ([tap] if tap else []):
        assert E.ipv6_addrs(d) == [], "%s has IPv6 addresses" % d
    if driver == "lxc":
        pid = E.lxc_init_pid(name)
        assert pid, "no init process for container %s" % name
        inside = E.netns_ipv6(pid)
        assert {"eth0", "eth1", "eth2"} <= set(inside), inside
        assert not any(addrs for ifname, addrs in inside.items() if ifname != "lo"), inside

    guests.destroy(driver, name)
    assert E.record(driver, name) is None
    assert_no_entries(m_br, m_net, m_eth, m_um)
    for m in (m_br, m_net, m_um):
        assert E.poll(lambda: E.link(dev[m]) is None, 5), "%s still exists" % dev[m]
    if tap:
        # libvirt leaves a managed='no' tap alone: fdbhook put it back as it was.
        assert E.port(tap)["ifindex"] == tap_index
        assert_untouched(tap, E.BR, m_eth)


def test_two_guests_started_at_once(guests, driver):
    names = ["%s-%s-two%d" % (E.PFX, driver, i) for i in (1, 2)]
    macs = {n: (mac(2, 2 * i + 1), mac(2, 2 * i + 2)) for i, n in enumerate(names)}
    for n in names:
        guests.define(driver, n, [E.nic_bridge(macs[n][0], E.BR, driver),
                                  E.nic_network(macs[n][1], E.NET, driver)])
    results = start_all(driver, names)
    assert [r[0] for r in results] == [0, 0], results
    uri = E.URIS[driver]
    for n in names:
        assert_managed(E.dev_of(uri, n, macs[n][0]), E.BR, macs[n][0])
        assert_managed(E.dev_of(uri, n, macs[n][1]), E.NET_BR, macs[n][1])
        assert record_macs(driver, n) == sorted(macs[n])
    procs = [subprocess.Popen(["virsh", "-q", "-c", uri, "destroy", n], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=E.CLEAN_ENV) for n in names]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for n in names:
        assert E.record(driver, n) is None
        assert_no_entries(*macs[n])


def test_metadata_opt_out(guests, driver):
    """mode='off' on the domain: nothing touched; on one NIC: only that NIC untouched."""
    uri = E.URIS[driver]
    off = "%s-%s-off" % (E.PFX, driver)
    m1, m2 = mac(3, 1), mac(3, 2)
    guests.define(driver, off, [E.nic_bridge(m1, E.BR, driver), E.nic_network(m2, E.NET, driver)],
                  E.metadata(mode="off"))
    part = "%s-%s-part" % (E.PFX, driver)
    m3, m4 = mac(3, 3), mac(3, 4)
    guests.define(driver, part, [E.nic_bridge(m3, E.BR, driver), E.nic_bridge(m4, E.BR, driver)],
                  E.metadata(nic_off=[m4]))
    guests.start(driver, off)
    guests.start(driver, part)
    assert_untouched(E.dev_of(uri, off, m1), E.BR, m1)
    assert_untouched(E.dev_of(uri, off, m2), E.NET_BR, m2)
    assert E.record(driver, off) is None
    assert_managed(E.dev_of(uri, part, m3), E.BR, m3)
    assert_untouched(E.dev_of(uri, part, m4), E.BR, m4)
    assert record_macs(driver, part) == [m3]
    guests.destroy(driver, off)
    guests.destroy(driver, part)
    assert E.record(driver, part) is None
    assert_no_entries(m1, m2, m3, m4)


def test_unmanageable_nic_fails_start_or_continues(guests, driver, foreign_port, config):
    """A foreign static entry for the guest's MAC on another port of the bridge.

    on_error=fail: ``virsh start`` fails with fdbhook's one-line reason and
    nothing is changed; on_error=continue: the guest starts, the other NIC is
    managed, the conflicting one and the foreign entry are left alone.
    """
    uri = E.URIS[driver]
    name = "%s-%s-bad" % (E.PFX, driver)
    m_bad, m_ok = mac(4, 1), mac(4, 2)
    E.run("bridge", "fdb", "add", m_bad, "dev", foreign_port, "master", "static")
    guests.define(driver, name, [E.nic_bridge(m_bad, E.BR, driver), E.nic_network(m_ok, E.NET, driver)])

    proc = guests.start(driver, name, check=False)
    assert proc.returncode != 0, proc.stdout
    print("virsh start (%s, on_error=fail) said:\n%s" % (driver, proc.stderr.strip()))
    line = hook_line(proc.stderr)
    assert line.startswith("fdbhook: domain %s: NIC " % name), line
    assert "already has a static FDB entry" in line and m_bad in line, line
    assert "Traceback" not in proc.stderr
    assert E.domain_state(uri, name) == "shut off"
    assert E.record(driver, name) is None
    assert [e["ifname"] for e in E.static_entries(E.BR, m_bad)] == [foreign_port]
    assert_no_entries(m_ok)

    config.configure(on_error="continue")
    guests.start(driver, name)
    assert E.domain_state(uri, name) == "running"
    assert_untouched(E.dev_of(uri, name, m_bad), E.BR, m_bad)
    assert [e["ifname"] for e in E.static_entries(E.BR, m_bad)] == [foreign_port]
    assert_managed(E.dev_of(uri, name, m_ok), E.NET_BR, m_ok)
    assert record_macs(driver, name) == [m_ok]
    guests.destroy(driver, name)
    assert E.record(driver, name) is None
    assert_no_entries(m_ok)
    assert [e["ifname"] for e in E.static_entries(E.BR, m_bad)] == [foreign_port]


def test_libvirtd_restart_reconnect_heals(guests, lv):
    """libvirtd restarted while guests run: the reconnect hook repairs drift made by hand."""
    drivers = ["qemu"]
    if E.virsh(E.LXC, "uri", check=False).returncode == 0:
        drivers.append("lxc")
    ports = {}
    for i, driver in enumerate(drivers):
        name = "%s-%s-reconn" % (E.PFX, driver)
        m_br, m_net = mac(5, 2 * i + 1), mac(5, 2 * i + 2)
        guests.define(driver, name, [E.nic_bridge(m_br, E.BR, driver), E.nic_network(m_net, E.NET, driver)])
        guests.start(driver, name)
        uri = E.URIS[driver]
        ports[driver] = (name, (E.dev_of(uri, name, m_br), E.BR, m_br), (E.dev_of(uri, name, m_net), E.NET_BR, m_net))
    # Drift by hand: learning back on; flood back on and the entry deleted.
    for driver, (name, (d_br, _, _), (d_net, _, m_net)) in ports.items():
        E.run("bridge", "link", "set", "dev", d_br, "learning", "on")
        E.run("bridge", "link", "set", "dev", d_net, "flood", "on")
        E.run("bridge", "fdb", "del", m_net, "dev", d_net, "master")
        assert E.port(d_br)["learning"] is True
    E.run(E.LIBVIRTD_UP, "restart", timeout=120)

    def healed():
        try:
            for _, *nics in ports.values():
                for dev, bridge, addr in nics:
                    assert_managed(dev, bridge, addr)
            return True
        except AssertionError:
            return False

    assert E.poll(healed, 30, 0.2), "not healed 30 s after the restart: %s" % {
        dev: (E.port(dev), E.static_entries(bridge, addr)) for _, *nics in ports.values() for dev, bridge, addr in nics}
    for driver, (name, *_) in ports.items():
        assert E.domain_state(E.URIS[driver], name) == "running"
        guests.destroy(driver, name)
        assert E.record(driver, name) is None


def test_fifty_start_destroy_cycles(guests, lv, ethernet_tap):
    """No entry, record, temporary file or spool growth is left behind."""
    name = "%s-qemu-cycle" % E.PFX
    m_br, m_net, m_eth = mac(6, 1), mac(6, 2), mac(6, 3)
    guests.define("qemu", name, [E.nic_bridge(m_br, E.BR), E.nic_network(m_net, E.NET),
                                 E.nic_ethernet(m_eth, ethernet_tap)])
    before_state = E.state_files()
    before_entries = {b: sorted((e["mac"], e["ifname"]) for e in E.static_entries(b)) for b in (E.BR, E.NET_BR)}
    spool_sizes = []
    started = time.monotonic()
    for i in range(50):
        guests.start("qemu", name)
        assert record_macs("qemu", name) == sorted([m_br, m_net, m_eth]), "cycle %d" % i
        if i % 10 == 0:
            assert_managed(E.dev_of(E.QEMU, name, m_br), E.BR, m_br)
            assert_managed(ethernet_tap, E.BR, m_eth)
        guests.destroy("qemu", name)
        assert E.record("qemu", name) is None, "cycle %d" % i
        spool_sizes.append(sum(E.spool(lv.spool).values()))
    elapsed = time.monotonic() - started
    assert_untouched(ethernet_tap, E.BR, m_eth)
    assert_no_entries(m_br, m_net, m_eth)
    assert {b: sorted((e["mac"], e["ifname"]) for e in E.static_entries(b)) for b in (E.BR, E.NET_BR)} \
        == before_entries
    assert E.state_files() == before_state
    assert max(spool_sizes) <= lv.spool_max, spool_sizes
    leftovers = [n for n in E.spool(lv.spool) if not n.endswith(".json")]
    assert not leftovers, leftovers
    print("50 cycles in %.1f s; spool %d..%d bytes (max %d)" % (elapsed, min(spool_sizes), max(spool_sizes),
                                                                  lv.spool_max))


def test_lxc_cycles(guests, lv, lxc_ok):
    name = "%s-lxc-cycle" % E.PFX
    m_br, m_net = mac(7, 1), mac(7, 2)
    guests.define("lxc", name, [E.nic_bridge(m_br, E.BR, "lxc"), E.nic_network(m_net, E.NET, "lxc")])
    before_state = E.state_files()
    for i in range(10):
        guests.start("lxc", name)
        assert record_macs("lxc", name) == sorted([m_br, m_net]), "cycle %d" % i
        guests.destroy("lxc", name)
        assert E.record("lxc", name) is None, "cycle %d" % i
    assert_no_entries(m_br, m_net)
    assert E.state_files() == before_state
    assert sum(E.spool(lv.spool).values()) <= lv.spool_max


def fdbhook_cli(*args):
    """The fdbhook command install.sh put on root's PATH, with the hooks' view of the world."""
    exe = "/usr/local/bin/fdbhook" if os.access("/usr/local/bin/fdbhook", os.X_OK) else "fdbhook"
    return E.run(exe, *args, check=False, timeout=60)


def test_capture_and_replay(guests, lv):
    """With capture on, every hook call lands in the spool; ``fdbhook replay`` re-runs one."""
    name = "%s-qemu-replay" % E.PFX
    m_br, m_net = mac(8, 1), mac(8, 2)
    guests.define("qemu", name, [E.nic_bridge(m_br, E.BR), E.nic_network(m_net, E.NET)])
    guests.start("qemu", name)
    guests.destroy("qemu", name)
    ops = [rec["argv"][1] for _, rec in E.captures(lv.spool, "qemu", name)]
    assert ops == ["prepare", "start", "started", "stopped", "release"], ops
    port_ops = [rec["argv"][1] for _, rec in E.captures(lv.spool, "network", E.NET)
                if name in rec.get("stdin", "")]
    assert port_ops == ["port-created", "port-deleted"], port_ops

    guests.start("qemu", name)
    dev = E.dev_of(E.QEMU, name, m_br)
    assert_managed(dev, E.BR, m_br)
    started = E.captures(lv.spool, "qemu", name, "started")[-1][0]
    release = E.captures(lv.spool, "qemu", name, "release")[-1][0]
    prepare = E.captures(lv.spool, "qemu", name, "prepare")[-1][0]
    created = [p for p, rec in E.captures(lv.spool, "network", E.NET, "port-created")
               if name in rec.get("stdin", "")][-1]

    # started: applies (and heals) exactly as the hook does
    E.run("bridge", "link", "set", "dev", dev, "learning", "on")
    proc = fdbhook_cli("replay", started)
    assert proc.returncode == 0, proc.stderr
    assert_managed(dev, E.BR, m_br)
    # release: tears down from the record, as at the guest's end
    proc = fdbhook_cli("replay", release)
    assert proc.returncode == 0, proc.stderr
    assert_untouched(dev, E.BR, m_br)
    assert E.record("qemu", name) is None
    # started again: managed again
    assert fdbhook_cli("replay", started).returncode == 0
    assert_managed(dev, E.BR, m_br)
    assert record_macs("qemu", name) == sorted([m_br, m_net])
    # prepare: nothing, empty stdout
    proc = fdbhook_cli("replay", prepare)
    assert proc.returncode == 0 and proc.stdout == "", (proc.stdout, proc.stderr)
    # network port-created: nothing to do, and it never waits for the tap
    t0 = time.monotonic()
    proc = fdbhook_cli("replay", created)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 5
    assert_managed(dev, E.BR, m_br)

    guests.destroy("qemu", name)
    assert E.record("qemu", name) is None
    assert_no_entries(m_br, m_net)


def _kernel_can_filter_vlans():
    probe = "%s-vlprobe" % E.PFX
    ok = E.run("ip", "link", "add", probe, "type", "bridge", "vlan_filtering", "1", check=False).returncode == 0
    E.run("ip", "link", "del", "dev", probe, check=False)
    return ok


@pytest.fixture
def network2(config):
    """A second isolated network whose [network] section asks for VLAN filtering."""
    import tempfile
    name, bridge = "%s-net2" % E.PFX, "%s-nbr2" % E.PFX
    config.configure(extra="[network %s]\nvlan_filtering = on\n" % name)
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as handle:
        handle.write("<network><name>%s</name><bridge name='%s' stp='off' delay='0'/></network>" % (name, bridge))
    try:
        E.virsh(E.QEMU, "net-define", handle.name)
    finally:
        os.unlink(handle.name)
    try:
        yield name, bridge
    finally:
        E.virsh(E.QEMU, "net-destroy", name, check=False)
        E.virsh(E.QEMU, "net-undefine", name, check=False)


def test_network_hook(guests, lv, network2):
    """The network hook at net-start/started and for the guest's ports."""
    name, bridge = network2
    proc = E.virsh(E.QEMU, "net-start", name, check=False)
    assert proc.returncode == 0, proc.stderr
    ops = [rec["argv"][1] for _, rec in E.captures(lv.spool, "network", name)]
    assert ops == ["start", "started"], ops
    filtering = E.link(bridge)["linkinfo"]["info_data"].get("vlan_filtering")
    can = _kernel_can_filter_vlans()
    print("kernel can filter VLANs: %s; %s vlan_filtering after net-start: %s" % (can, bridge, filtering))
    assert filtering == (1 if can else 0)

    dom = "%s-qemu-net2" % E.PFX
    m = mac(9, 1)
    guests.define("qemu", dom, [E.nic_network(m, name)])
    guests.start("qemu", dom)
    assert_managed(E.dev_of(E.QEMU, dom, m), bridge, m)
    created = [r for _, r in E.captures(lv.spool, "network", name, "port-created")]
    assert len(created) == 1 and m in created[0]["stdin"] and dom in created[0]["stdin"]
    guests.destroy("qemu", dom)
    assert E.record("qemu", dom) is None
    assert not E.static_entries(bridge, m)
    E.virsh(E.QEMU, "net-destroy", name)
    ops = [rec["argv"][1] for _, rec in E.captures(lv.spool, "network", name)]
    assert ops == ["start", "started", "port-created", "port-deleted", "stopped"], ops


def test_beside_a_foreign_hook(guests, lv, tmp_path):
    """An admin's own /etc/libvirt/hooks/qemu: install.sh puts fdbhook into qemu.d/ and libvirt runs both."""
    main = os.path.join(E.HOOK_DIR, "qemu")
    if E.hook_targets().get("qemu") != main:
        pytest.skip("fdbhook is not the main qemu hook on this host (the admin has one): not touching it")
    log = tmp_path / "foreign.log"
    had_dir = os.path.exists(main + ".d")
    tmp = main + ".fdbe2e-tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("#!/bin/sh\n# %s: an admin's own hook, put here by fdbhook's system tests\n"
                     "echo \"$*\" >> %s\ncat > /dev/null\n" % (FOREIGN_HOOK_MARK, log))
    os.chmod(tmp, 0o755)
    os.rename(tmp, main)
    try:
        with open(main, "rb") as handle:
            foreign = handle.read()
        proc = install_hooks()
        assert "fdbhook goes to %s.d/50-fdbhook" % main in proc.stdout, proc.stdout
        assert "restarted" in proc.stdout, proc.stdout
        with open(main, "rb") as handle:
            assert handle.read() == foreign, "install.sh overwrote the foreign hook"
        assert E.hook_targets()["qemu"] == main + ".d/50-fdbhook"

        name = "%s-qemu-foreign" % E.PFX
        m = mac(10, 1)
        guests.define("qemu", name, [E.nic_bridge(m, E.BR)])
        guests.start("qemu", name)
        assert_managed(E.dev_of(E.QEMU, name, m), E.BR, m)
        guests.destroy("qemu", name)
        assert E.record("qemu", name) is None
        assert_no_entries(m)
        calls = log.read_text().splitlines()
        # libvirt 11.3 (Debian 13) passes the shutoff reason to release: "release end destroyed"
        release = "release end destroyed" if calls[-1:] == ["%s release end destroyed" % name] else "release end -"
        assert ["%s %s" % (name, op) for op in ("prepare begin -", "start begin -", "started begin -",
                                                "stopped end -", release)] == calls, calls
    finally:
        with open(main, encoding="utf-8", errors="replace") as handle:
            still_foreign = FOREIGN_HOOK_MARK in handle.read(512)
        if still_foreign:
            os.unlink(main)
        proc = install_hooks()
    # The admin's hook gone, the next install.sh makes fdbhook the main hook again.
    assert "removed %s.d/50-fdbhook" % main in proc.stdout, proc.stdout
    assert E.hook_targets()["qemu"] == main
    assert os.path.exists(main + ".d") == had_dir


def test_extra_macs_and_lock_mode_from_the_domains_metadata(guests, driver):
    """A real guest whose metadata lists extra MACs and asks for lock mode: entries, lock, teardown."""
    uri = E.URIS[driver]
    name = "%s-%s-extra" % (E.PFX, driver)
    own, vrrp, inner = mac(9, 1), "00:00:5e:00:01:0a", "02:00:00:e2:09:02"
    meta = ("<metadata><fdb:fdb xmlns:fdb='%s'><fdb:interface mac='%s' extra-macs='%s %s' locked='yes'/>"
            "</fdb:fdb></metadata>" % (E.FDBNS, own, vrrp, inner))
    guests.define(driver, name, [E.nic_bridge(own, E.BR, driver)], meta)
    guests.start(driver, name)
    dev = E.dev_of(uri, name, own)
    for addr in (own, vrrp, inner):
        assert_managed(dev, E.BR, addr)
    assert E.link(dev)["linkinfo"]["info_slave_data"]["locked"] is True
    rec = E.record(driver, name)["nics"][0]
    assert rec["extra_macs"] == [vrrp, inner] and rec["locked"] is True
    guests.destroy(driver, name)
    assert E.record(driver, name) is None
    assert_no_entries(own, vrrp, inner)
