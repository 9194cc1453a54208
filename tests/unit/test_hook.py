"""The hook contract: which operations act, exit codes, stdout, stderr."""

import pytest

from fdbhook.hook import run_hook
from fdbhook.state import Store
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, config, domain_xml

XML = domain_xml([bridge_nic()])


@pytest.fixture
def env(tmp_path):
    return FakeKernel.bridge_with_ports("br0", ("vnet0",)), Store(str(tmp_path)), config()


def hook(env, op, data=XML, driver="qemu", cfg=None):
    kernel, store, default_cfg = env
    return run_hook(driver, ["t1", op, "begin", "-"], data, config=cfg or default_cfg, kernel=kernel,
                    store=store)


@pytest.mark.parametrize("op", ["prepare", "restore", "attach", "migrate", "shutdown", "whatever"])
def test_inert_operations(env, op):
    result = hook(env, op)
    assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert env[0].executed == []


@pytest.mark.parametrize("op", ["start", "started", "reconnect"])
def test_apply_operations(env, op):
    assert hook(env, op).code == 0
    assert env[0].by_name("vnet0").learning is False
    assert env[1].load("qemu", "t1") is not None


def test_lxc_driver_uses_its_own_records(env):
    xml = domain_xml([bridge_nic()], dtype="lxc")
    assert hook(env, "start", xml, driver="lxc").code == 0
    assert env[1].load("lxc", "t1") is not None and env[1].load("qemu", "t1") is None
    assert hook(env, "release", b"", driver="lxc").code == 0
    assert env[1].load("lxc", "t1") is None


def test_stopped_tears_down_even_with_broken_xml(env):
    assert hook(env, "start").code == 0
    result = hook(env, "stopped", b"<garbage")
    assert (result.code, result.stderr) == (0, "")
    assert env[0].by_name("vnet0").learning is True
    assert env[1].load("qemu", "t1") is None
    assert hook(env, "release").code == 0


def test_failure_exits_1_with_one_line(env):
    xml = domain_xml([bridge_nic(dev="vnet404")])
    result = hook(env, "start", xml)
    assert result.code == 1
    assert result.stderr == "fdbhook: domain t1: NIC net0 (52:54:00:00:00:01): port vnet404 does not exist"
    assert result.stdout == ""


def test_on_error_continue(env):
    cfg = config("[manage]\nbridges = br0\n[hook]\non_error = continue\n")
    result = hook(env, "start", domain_xml([bridge_nic(dev="vnet404")]), cfg=cfg)
    assert (result.code, result.stderr) == (0, "")


def test_invalid_xml_at_start(env):
    result = hook(env, "start", b"<domain><name>t1</name><devices><interface type='bridge'><source bridge='br0'/>")
    assert result.code == 1 and result.stderr.startswith("fdbhook: domain t1: invalid XML:")
    assert "\n" not in result.stderr
    assert env[0].executed == []


HOSTILE = [
    b"<domain><name>t1</name><devices>",  # truncated
    b"<!DOCTYPE d [<!ENTITY x 'y'>]><domain><name>t1</name></domain>",
    b"\x00\xff garbage",
    b"<domain xmlns:fdb='x'><metadata><fdb:fdb>bad</fdb:fdb></metadata><name>t1</name><devices>"
    b"<interface type='bridge'><source bridge='other'/></interface></devices></domain>",
    b"",
]


@pytest.mark.parametrize("data", HOSTILE)
@pytest.mark.parametrize("on_error", ["fail", "continue"])
def test_guest_not_ours_always_starts(env, data, on_error):
    """Issue 18 item 5: XML naming no managed bridge/network exits 0 before any parser sees it."""
    cfg = config("[manage]\nbridges = br0\n[hook]\non_error = %s\n" % on_error)
    for op in ("start", "started", "reconnect"):
        assert hook(env, op, data, cfg=cfg) == run_hook.__globals__["HookResult"](0)
    assert env[0].executed == []


def test_no_config_exits_0_for_any_input(env, tmp_path, monkeypatch):
    monkeypatch.setenv("FDBHOOK_CONF", str(tmp_path / "absent.conf"))
    monkeypatch.setenv("FDBHOOK_STATE_DIR", str(tmp_path / "state"))
    for data in HOSTILE + [XML]:
        for op in ("prepare", "start", "started", "reconnect", "migrate", "stopped", "release"):
            result = run_hook("qemu", ["t1", op, "begin", "-"], data, kernel=env[0])
            assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert env[0].executed == []


def test_maybe_ours_reads_names_from_bytes():
    from fdbhook.hook import maybe_ours, xml_names

    cfg = config("[manage]\nbridges = br*\n")
    assert xml_names(b"<source bridge=\"br0\"/><source network='n1'/>") == {"bridge": {"br0"}, "network": {"n1"}}
    assert xml_names(b"<source bridge='b&#114;0'/>") is None  # only a parser can read that: it decides
    assert maybe_ours(cfg, "qemu", "t1", b"<source bridge='br7'/>", False)
    assert not maybe_ours(cfg, "qemu", "t1", b"<source bridge='virbr0'/>", False)
    assert maybe_ours(cfg, "qemu", "t1", b"", True)  # a record: ours whatever the XML says
    assert maybe_ours(cfg, "qemu", "t1", b"<source network='default'/>", False)  # its bridge may be br*
    assert maybe_ours(cfg, "qemu", "t1", b"<interface type='ethernet'><target dev='tap5'/>", False)  # kernel decides


def test_bad_config_uses_last_good_in_hooks(env, tmp_path, monkeypatch):
    from fdbhook.config import ConfigCache

    conf, state = tmp_path / "f.conf", tmp_path / "state"
    monkeypatch.setenv("FDBHOOK_CONF", str(conf))
    monkeypatch.setenv("FDBHOOK_STATE_DIR", str(state))
    monkeypatch.setenv("FDBHOOK_LIBVIRT_NETWORK_DIRS", "/nonexistent-net")
    conf.write_text("[manage]\nbridges = br0\n")
    assert ConfigCache().get().bridges == ("br0",)  # fdbhookd read it: saved as the last good one
    conf.write_text("[manage]\nbridgez = br0\n")
    result = run_hook("qemu", ["t1", "start", "begin", "-"], XML, kernel=env[0])
    assert result.code == 0
    assert env[0].by_name("vnet0").learning is False  # managed with the last good config


def test_bad_argv_and_driver(env):
    assert run_hook("qemu", ["t1"], b"").code == 2
    assert run_hook("xen", ["t1", "start"], b"").code == 2


def test_nothing_configured_is_a_fast_no_op(tmp_path):
    from fdbhook.config import Config

    kernel = FakeKernel.bridge_with_ports("br0", ("vnet0",))
    result = run_hook("qemu", ["t1", "start", "begin", "-"], XML, config=Config(), kernel=kernel,
                      store=Store(str(tmp_path)))
    assert result.code == 0 and kernel.executed == []


def test_incoming_migration_waits_for_resume_with_the_daemon(env):
    """migrate (destination) -> start/started lock the port down without entry; resume adds it."""
    from fdbhook.engine import reapply_record

    kernel, store, cfg = env
    assert run_hook("qemu", ["t1", "migrate", "begin", "-"], XML, config=cfg, kernel=kernel, store=store,
                    daemon=True).code == 0
    assert store.is_incoming("qemu", "t1")
    for op in ("prepare", "start", "started"):
        assert run_hook("qemu", ["t1", op, "begin", "-"], XML, config=cfg, kernel=kernel, store=store,
                        daemon=True).code == 0
    port = kernel.by_name("vnet0")
    assert port.learning is False and port.flood is False
    assert kernel.fdb_get("52:54:00:00:00:01", 10) is None
    assert store.load("qemu", "t1").paused is True
    reapply_record("qemu", "t1", kernel, store, cfg, paused=False)  # the daemon's RESUMED handler
    assert kernel.fdb_get("52:54:00:00:00:01", 10).ifindex == port.ifindex
    assert store.load("qemu", "t1").paused is False


def test_incoming_migration_refuses_at_start_what_resume_could_not_add(env):
    """Somebody else's static entry for the guest's MAC on the destination: the start hook fails
    (libvirt aborts the migration, the source keeps the guest), not the RESUMED handler later."""
    from fdbhook.model import FdbEntry

    _, store, cfg = env
    kernel = FakeKernel.bridge_with_ports("br0", ("vnet0", "eth0"))
    eth0 = kernel.by_name("eth0")
    kernel.add_entry(kernel.by_name("br0").ifindex, FdbEntry(mac="52:54:00:00:00:01", ifindex=eth0.ifindex,
                                                             static=True, local=False))
    assert run_hook("qemu", ["t1", "migrate", "begin", "-"], XML, config=cfg, kernel=kernel, store=store,
                    daemon=True).code == 0
    result = run_hook("qemu", ["t1", "start", "begin", "-"], XML, config=cfg, kernel=kernel, store=store,
                      daemon=True)
    assert result.code == 1 and "not ours" in result.stderr
    assert kernel.by_name("vnet0").learning is True and store.load("qemu", "t1") is None
    assert kernel.fdb_get("52:54:00:00:00:01", kernel.by_name("br0").ifindex).ifindex == eth0.ifindex


def test_incoming_migration_without_the_daemon_adds_entries_at_start(env):
    kernel, store, cfg = env
    store.mark_incoming("qemu", "t1")  # left by a daemon that has died since
    assert hook(env, "started").code == 0
    assert kernel.fdb_get("52:54:00:00:00:01", 10) is not None


def test_suspend_and_resume_from_the_record(env):
    from fdbhook.engine import reapply_record

    kernel, store, cfg = env
    assert hook(env, "start").code == 0
    reapply_record("qemu", "t1", kernel, store, cfg, paused=True)
    assert kernel.fdb_get("52:54:00:00:00:01", 10) is None and kernel.by_name("vnet0").learning is False
    assert hook(env, "reconnect").code == 0  # a reconnect keeps a paused guest paused
    assert kernel.fdb_get("52:54:00:00:00:01", 10) is None
    reapply_record("qemu", "t1", kernel, store, cfg, paused=False)
    assert kernel.fdb_get("52:54:00:00:00:01", 10) is not None


def test_client_reads_exactly_one_byte_more_than_the_parser_accepts():
    from fdbhook.client import MAX_STDIN
    from fdbhook.domxml import MAX_XML_BYTES

    assert MAX_STDIN == MAX_XML_BYTES + 1


def test_inert_hook_imports_no_lxml_or_pyroute2():
    import subprocess
    import sys

    code = ("import io, sys; from fdbhook.client import main; "
            "main('qemu', ['t1', 'prepare', 'begin', '-'], io.BytesIO(b'<domain/>')); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lxml', 'pyroute2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"FDBHOOK_NO_DAEMON": "1", "FDBHOOK_CONF": "/nonexistent", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": __file__.rsplit("/tests/", 1)[0]})
    assert out.stdout.strip().splitlines()[-1] == "[]", out


def test_client_says_why_the_daemon_did_not_answer(tmp_path):
    """Issue 18 item 6: absent (no socket / refused) vs busy (accepted, no answer in time)."""
    import socket

    from fdbhook import client

    assert client.offer("qemu", ["t1", "prepare"], b"", path=str(tmp_path / "none.sock")) is None
    assert client.last_failure == "absent"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "busy.sock"))
        server.listen(1)  # listening, never accepting: the connect succeeds, no answer comes
        assert client.offer("qemu", ["t1", "prepare"], b"", path=str(tmp_path / "busy.sock"), timeout=0.1) is None
        assert client.last_failure == "busy"


def test_standalone_marks_incoming_migration_and_busy_fallback_waits_for_resume(env, tmp_path, monkeypatch):
    kernel, store, cfg = env
    assert run_hook("qemu", ["t1", "migrate", "begin", "-"], XML, config=cfg, kernel=kernel, store=store).code == 0
    assert store.is_incoming("qemu", "t1")  # marked without fdbhookd too
    # fdbhookd busy: the fallback has its semantics (ports locked down, entry at RESUMED)
    assert run_hook("qemu", ["t1", "start", "begin", "-"], XML, config=cfg, kernel=kernel, store=store,
                    daemon=True).code == 0
    assert kernel.by_name("vnet0").learning is False and store.load("qemu", "t1").paused
