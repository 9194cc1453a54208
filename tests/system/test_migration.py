"""Live migration between two hosts on this machine (tests/hostlab.py), with a real guest OS.

Each host is its own libvirtd 9.0 + fdbhookd + fdbhook's installed hooks in
its own mount/network/UTS namespace; the guest (tests/guestos.py) answers
PING frames from a probe on the wire, so "the guest got it" means a running
guest answered. Both kernels are read independently with ``bridge -j fdb`` and
``ip -d -j link`` (tests.hostlab.Timeline samples them all through each
migration); libvirt's lifecycle events come from ``virsh event --timestamp``.

Figures (lost frames, gap) are recorded as test properties and printed; the
speed comparison is bench/migration.py's job, not a test's.
"""

import json
import os

import pytest

from fdbhook.lab import poll

pytestmark = pytest.mark.libvirt

REQUIRED = os.environ.get("FDBHOOK_E2E_REQUIRED") == "1"
MAC = "52:54:00:fd:00:01"  # the managed guest (fxd-br, tap fxd-t1)
UM_MAC = "52:54:00:fd:00:02"  # the baseline guest (fxd-um, tap fxd-t2)
GUEST, UM_GUEST = "fxd-g1", "fxd-g2"
TAP, UM_TAP = "fxd-t1", "fxd-t2"
TOLERANCE = 0.05  # s: virsh prints an event a little after libvirtd emitted it
UPLINKS = ("fxd-up", "fxd-upu")


def _unavailable(reason):
    if REQUIRED:
        pytest.fail("%s (FDBHOOK_E2E_REQUIRED=1: tests/run set libvirt up, so this is a failure)" % reason,
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, libvirtd)")
    if os.environ.get("FDBHOOK_SKIP_LIBVIRT") == "1":
        pytest.skip("FDBHOOK_SKIP_LIBVIRT=1")
    if os.environ.get("FDBHOOK_STACK"):
        # inside tests/stacks.py's throwaway host: its PID/mount namespaces are not a machine
        # two more libvirt hosts can be built in; the two-host lab runs on the machine itself
        pytest.skip("the two-host lab runs on the machine's own Debian 12 libvirt, not in %s"
                    % os.environ["FDBHOOK_STACK"])
    from tests import guestos, hostlab

    try:
        guestos.image()  # built once, cached
    except Exception as exc:  # a missing kernel/busybox/gcc that apt could not fetch
        _unavailable("guest OS image: %s" % exc)
    with hostlab.two_hosts() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def guest(lab):
    """The managed guest, booted on A once; every test starts and ends with it running on A."""
    from tests import hostlab

    lab.a.create(hostlab.os_guest_xml(GUEST, MAC, tap=TAP))
    _wait_answers(lab, lab.a, GUEST)
    return GUEST


def _wait_answers(lab, host, name, timeout=120):
    from tests import hostlab

    control = hostlab.guest_control(host, name)
    try:
        control.wait_ready(timeout)
    finally:
        control.close()


def _alive(host, name, timeout=10.0):
    """Does the guest's init still answer on its command channel? (A TCG guest here can hang in a soft
    lockup after a migration on a loaded machine: then it answers nothing, whatever the bridges do.)"""
    from tests import hostlab

    control = hostlab.guest_control(host, name)
    try:
        rc, lines = control.raw_call("ping", timeout=timeout)
        return rc == 0 and "pong" in lines
    except AssertionError:
        return False
    finally:
        control.close()


def _observed(lab, record_property, src, dst, name=None, mac=None, xml=None, **kw):
    """hostlab.observed_migration, once more if the guest hung after it (as bench/migration.py leaves
    such a migration out): the guest answered no frame from DST *and* its init answers nothing on its
    command channel either. A guest that answers its channel but no frame is a failure, never retried."""
    from tests import hostlab

    name, mac = name or GUEST, mac or MAC
    obs = hostlab.observed_migration(lab, name, mac, src, dst, **kw)
    if obs.summary().get("to") == dst.name or _alive(dst, name):
        return obs
    record_property("%s hung after %s->%s, booted again" % (name, src.name, dst.name), 1)
    print("%s hung after %s->%s (its command channel is silent too): booted again on %s, migrated once more"
          % (name, src.name, dst.name, src.name))
    _boot_again(lab, name, xml or hostlab.os_guest_xml(GUEST, MAC, tap=TAP), dst, src)
    return hostlab.observed_migration(lab, name, mac, src, dst, **kw)


def _boot_again(lab, name, xml, on, at):
    """The (hung) guest destroyed on host ``on``, booted afresh on host ``at``, answering."""
    on.virsh("destroy", name, check=False)
    assert poll(lambda: not on.state(name), timeout=60), on.state(name)
    at.create(xml)
    _wait_answers(lab, at, name)


@pytest.fixture
def home(lab, guest):
    """The guest on A, running, with its entry, before and after the test."""
    _bring_home(lab)
    yield guest
    _bring_home(lab)


def _bring_home(lab):
    from tests import hostlab

    for host in lab.hosts:
        if host.fdbhookd is None:
            host.start_fdbhookd()
            assert poll(host.daemon_watching, timeout=30), host.tail("fdbhookd.log")
    if lab.b.state(GUEST) and not lab.a.state(GUEST):
        if lab.b.state(GUEST) != "running":
            lab.b.virsh("resume", GUEST, check=False)
        lab.migrate(GUEST, lab.b, lab.a)
    if not lab.a.state(GUEST):
        lab.a.create(hostlab.os_guest_xml(GUEST, MAC, tap=TAP))
        _wait_answers(lab, lab.a, GUEST)
    if lab.a.state(GUEST) != "running":
        lab.a.virsh("resume", GUEST)
    if not _alive(lab.a, GUEST):  # hung after an earlier migration: a fresh boot, not a poisoned next test
        _boot_again(lab, GUEST, hostlab.os_guest_xml(GUEST, MAC, tap=TAP), lab.a, lab.a)
    assert poll(lambda: lab.a.static_entries(MAC), timeout=10), lab.a.fdb()


def _report(record_property, label, obs):
    summary = obs.summary()
    record_property(label, json.dumps(summary, sort_keys=True))
    print("%s: %s" % (label, json.dumps(summary, sort_keys=True)))
    return summary


def _port_states(timeline, host, tap):
    """The distinct (learning, flood) states of TAP on HOST's bridge, in the order seen."""
    out = []
    for _, _, ports in timeline.samples[host]:
        state = ports.get(tap)
        if state is not None and (not out or out[-1] != state):
            out.append(state)
    return out


def _check_managed_move(obs, src, dst):
    from tests import hostlab

    tl = obs.timeline
    assert obs.suspended and obs.resumed, (obs.src_events.events, obs.dst_events.events)
    # 1. the destination port: locked down from its start hook on (libvirt attaches the tap
    # a moment before the hook runs), never unlocked again, and no entry before the resume
    states = _port_states(tl, dst.name, TAP)
    assert states and states[-1] == (False, False), states
    assert (False, False) not in states[:-1], "port unlocked again on %s: %s" % (dst.name, states)
    locked = tl.first(dst.name, lambda e, p: p.get(TAP) == (False, False))
    entry = tl.first(dst.name, lambda e, p: TAP in e)
    assert locked is not None and entry is not None, tl.samples[dst.name][-3:]
    joined = tl.first(dst.name, lambda e, p: TAP in p)
    period = (tl.samples[dst.name][-1][0] - tl.samples[dst.name][0][0]) / max(1, len(tl.samples[dst.name]) - 1)
    hand = hostlab.handover(obs, UPLINKS)
    print("%s->%s: tap on %s's bridge %.3f s before its start hook locked it; entry %.3f s after the resume;"
          " one sample every %.3f s; bridge monitors: entry in on %s %s ms after the source's went"
          % (src.name, dst.name, dst.name, locked - joined, entry - obs.resumed, period, dst.name,
             hand.get("dst_add_after_src_del_ms")))
    assert entry > obs.suspended, "entry on %s before the source paused" % dst.name
    assert any(p.get(TAP) == (False, False) and TAP not in e for t, e, p in tl.samples[dst.name]
               if locked <= t < obs.resumed), "never saw the locked, entry-less port while paused"
    # the source: entry there until the pause, gone after it
    gone = tl.first(src.name, lambda e, p: TAP not in e)
    assert gone is not None and gone >= obs.suspended - TOLERANCE, (gone, obs.suspended)
    held = [t for t, e, _ in tl.samples[src.name] if TAP in e]
    assert held and held[0] < obs.suspended, "source held no entry before the migration"
    # never both hosts at once (on a guest port; a learned entry on an uplink is not static)
    assert tl.overlaps(UPLINKS) == [], tl.overlaps(UPLINKS)[:3]
    # 2. frames: answered from the source before and from the destination after, nothing to a
    # stale port once the guest runs on the destination
    summary = obs.summary()
    assert (summary.get("from"), summary.get("to")) == (src.name, dst.name), summary
    assert summary["stale_after_resume"] == 0, summary


def test_migration_moves_the_entry_at_pause_and_resume(lab, home, record_property):
    by_frame = 0
    for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
        before = _first_frames(dst)
        obs = _observed(lab, record_property, src, dst)
        _report(record_property, "fdbhook %s->%s" % (src.name, dst.name), obs)
        _check_managed_move(obs, src, dst)
        by_frame += 1 if poll(lambda: _first_frames(dst) > before, timeout=2) else 0
        # the destination's record says running, its incoming mark is gone; the source has nothing
        assert poll(lambda: not _incoming(dst), timeout=5), _incoming(dst)
        assert src.records() == [] and src.static_entries(MAC) == [], (src.records(), src.fdb())
        assert [e["ifname"] for e in dst.static_entries(MAC)] == [TAP]
    # The entry went in at the guest's first frame on its new port (QEMU's announce, sent as the CPUs
    # start), not at RESUMED. libvirt's RESUMED comes a few ms later and would do the same: it may win
    # the race on a loaded machine now and then, but not in both directions.
    record_property("entries put in by the first frame", by_frame)
    assert by_frame >= 1, (lab.a.tail("fdbhookd.log"), lab.b.tail("fdbhookd.log"))


def _first_frames(host):
    """How often HOST's fdbhookd put an incoming guest's entries in at its first frame (its log)."""
    return host.tail("fdbhookd.log", 10 ** 7).count("qemu/%s: first frame of the incoming guest on %s: entries in"
                                                     % (GUEST, TAP))


def test_unmanaged_bridge_baseline(lab, record_property):
    """The same move on an unmanaged bridge (learning and flood on, QEMU's announce frames)."""
    from tests import hostlab

    lab.a.create(hostlab.os_guest_xml(UM_GUEST, UM_MAC, bridge=hostlab.UNMANAGED, tap=UM_TAP))
    try:
        _wait_answers(lab, lab.a, UM_GUEST)
        for src, dst in ((lab.a, lab.b), (lab.b, lab.a)):
            obs = _observed(lab, record_property, src, dst, UM_GUEST, UM_MAC, bridge=hostlab.UNMANAGED,
                            xml=hostlab.os_guest_xml(UM_GUEST, UM_MAC, bridge=hostlab.UNMANAGED, tap=UM_TAP))
            summary = _report(record_property, "unmanaged %s->%s" % (src.name, dst.name), obs)
            assert (summary.get("from"), summary.get("to")) == (src.name, dst.name), summary
            assert _port_states(obs.timeline, dst.name, UM_TAP) == [(True, True)]
            assert all(not e for _, e, _ in obs.timeline.samples["a"] + obs.timeline.samples["b"])
            assert "qemu-%s.json" % UM_GUEST not in src.records() + dst.records()
    finally:
        for host in lab.hosts:
            host.virsh("destroy", UM_GUEST, check=False)


def test_without_fdbhookd_on_the_destination(lab, home, record_property):
    """README: without the daemon an incoming migration gets its entries at `started`, while paused."""
    lab.b.stop_fdbhookd()
    obs = _observed(lab, record_property, lab.a, lab.b)
    summary = _report(record_property, "no fdbhookd on b: a->b", obs)
    tl = obs.timeline
    assert _port_states(tl, "b", TAP)[-1] == (False, False)
    entry = tl.first("b", lambda e, p: TAP in e)
    assert entry is not None and entry < obs.resumed, (entry, obs.resumed)
    overlap = tl.overlaps(UPLINKS)
    both = round(overlap[-1][0] - overlap[0][0], 3) if overlap else 0
    record_property("no fdbhookd on b: both hosts held the entry (s)", both)
    print("no fdbhookd on b: entry on b %.3f s before the resume, both hosts held it for %.3f s"
          % (obs.resumed - entry, both))
    # the source (with its daemon) still removed its entry at the pause
    gone = tl.first("a", lambda e, p: TAP not in e)
    assert gone is not None and gone >= obs.suspended - TOLERANCE
    assert (summary.get("from"), summary.get("to")) == ("a", "b"), summary
    assert [e["ifname"] for e in lab.b.static_entries(MAC)] == [TAP]
    assert lab.a.records() == [] and lab.a.static_entries(MAC) == []


def test_destination_refuses(lab, home, record_property):
    """A static entry for the guest's MAC that is not fdbhook's on B: B's start hook refuses,
    the migration fails, A keeps its entry throughout and B keeps nothing."""
    from tests import hostlab

    hostlab.run(["bridge", "-n", lab.b.ns, "fdb", "replace", MAC, "dev", "fxd-up", "master", "static"])
    try:
        obs = hostlab.observed_migration(lab, GUEST, MAC, lab.a, lab.b, check=False)
        _report(record_property, "refused a->b", obs)
        assert obs.result.returncode != 0
        assert "fdbhook" in obs.result.stderr or "hook" in obs.result.stderr, obs.result.stderr
        assert all(TAP in e for _, e, _ in obs.timeline.samples["a"]), "A lost its entry"
        assert lab.a.state(GUEST) == "running"
        _assert_nothing_left(lab.b, foreign=("fxd-up",))
        summary = obs.traffic.summary()
        assert summary["from"] == summary["to"] == "a", summary  # (a busy machine may drop some)
        assert all(obs.traffic.via(seq) == "a" for seq in obs.traffic.pongs), "answered from b"
    finally:
        hostlab.run(["bridge", "-n", lab.b.ns, "fdb", "del", MAC, "dev", "fxd-up", "master"], check=False)


def test_guest_destroyed_on_the_destination_mid_way(lab, home, record_property):
    """A slow migration (1 MiB/s), the source suspended by --timeout, then the incoming guest
    destroyed on B: the migration fails, A resumes the guest and regains its entry."""
    from tests import hostlab

    def destroy_incoming(lab):
        # wait until the source has paused the guest (its entry is gone) and B is receiving it
        # (--timeout may pause A before B's QEMU is even up), then kill B's side
        assert poll(lambda: lab.a.state(GUEST) == "paused" and lab.b.state(GUEST) is not None,
                    timeout=90, interval=0.1), (lab.a.state(GUEST), lab.b.state(GUEST))
        assert poll(lambda: not lab.a.static_entries(MAC), timeout=10)
        # libvirt may refuse while it holds the incoming domain's job for a moment: retry
        tries = []

        def destroyed():
            proc = lab.b.virsh("destroy", GUEST, check=False)
            tries.append((proc.returncode, proc.stderr.strip()))
            # "Domain not found" when QEMU died of it before libvirt answered
            return proc.returncode == 0 or lab.b.state(GUEST) is None

        assert poll(destroyed, timeout=30, interval=0.2), "cannot destroy the incoming guest on b: %s" % tries[-3:]
        print("destroyed on b after %d tries: %s" % (len(tries), tries[-1]))

    obs = hostlab.observed_migration(lab, GUEST, MAC, lab.a, lab.b, check=False, during=destroy_incoming,
                                     extra=("--bandwidth", "1", "--timeout", "2"))
    _report(record_property, "destroyed on b mid-way", obs)
    assert obs.result.returncode != 0
    assert poll(lambda: lab.a.state(GUEST) == "running", timeout=30), lab.a.state(GUEST)
    assert poll(lambda: [e["ifname"] for e in lab.a.static_entries(MAC)] == [TAP], timeout=10), lab.a.fdb()
    tl = obs.timeline
    gone = tl.first("a", lambda e, p: TAP not in e)
    assert gone is not None, "A never removed its entry at the pause"
    assert tl.overlaps(UPLINKS) == []
    _assert_nothing_left(lab.b)
    summary = obs.traffic.summary()
    assert summary["from"] == summary["to"] == "a", summary


def _assert_nothing_left(host, foreign=()):
    assert host.state(GUEST) is None
    assert host.records() == [], host.records()
    assert _incoming(host) == []
    assert host.port(TAP) is None
    assert [e["ifname"] for e in host.static_entries(MAC)] == list(foreign), host.fdb()


def _incoming(host):
    """The migrate hook's marks of incoming migrations still on HOST."""
    path = host.path("/run/fdbhook/incoming")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_guest_destroyed_on_the_source_mid_way(lab, home, record_property):
    """The guest destroyed on A while B is receiving it: the migration fails and neither host keeps
    anything (A's stop hooks tear down, B's aborted incoming guest leaves no tap, record or mark)."""
    from tests import hostlab

    def destroy_source(lab):
        assert poll(lambda: lab.b.port(TAP) == {**(lab.b.port(TAP) or {}), "learning": False, "flood": False},
                    timeout=60, interval=0.05), "B never locked the incoming port down"
        lab.a.virsh("destroy", GUEST)

    obs = hostlab.observed_migration(lab, GUEST, MAC, lab.a, lab.b, check=False, during=destroy_source,
                                     extra=("--bandwidth", "1"))
    _report(record_property, "destroyed on a mid-way", obs)
    assert obs.result.returncode != 0
    assert all(not e for _, e, _ in obs.timeline.samples["b"]), "B added an entry"
    for host in lab.hosts:
        assert poll(lambda: host.state(GUEST) is None and not host.records() and host.port(TAP) is None,
                    timeout=30), (host.name, host.state(GUEST), host.records())
        _assert_nothing_left(host)


def test_a_guest_that_answers_nothing_is_told_from_one_that_does(lab, home):
    """_observed retries a migration only for a guest whose init is silent (a TCG soft lockup); a paused
    guest stands in for a hung one here."""
    assert _alive(lab.a, GUEST)
    lab.a.virsh("suspend", GUEST)
    try:
        assert not _alive(lab.a, GUEST, timeout=2.0)
    finally:
        lab.a.virsh("resume", GUEST)
    assert poll(lambda: _alive(lab.a, GUEST), timeout=30)
