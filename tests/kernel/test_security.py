"""Kernel tier, ``security`` marker: issue 21's attacks, one test each, as an attacker would try them.

The test runs as root (fdbhook's position: libvirtd's hooks, fdbhookd); the
attacker's steps run as a throwaway unprivileged uid in a child forked from
this process after every import (``as_attacker``): nothing that user runs
is read from the checkout, which CI may keep where such a user cannot
traverse. Domain XML is the other attacker: a tenant who writes only their
own guest's definition.

This machine has ``fs.protected_symlinks = 0`` and ``fs.protected_regular =
0`` (global sysctls): the defences must not depend on them, and the
symlink cases are only meaningful with them off (skipped with a reason
where a system has them on). Nothing here waits for a time to pass except
the daemon's read deadline, polled with a generous bound.
"""

import grp
import io
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from fdbhook import cli, logsetup  # noqa: F401 (loaded before any fork: the attacker's child reads no file)
from fdbhook.capture import capture
from fdbhook.client import encode_request, unpack
from fdbhook.config import parse_config
from fdbhook.hook import run_hook
from fdbhook.lab import Lab, in_netns, poll
from fdbhook.metrics import write_textfile
from fdbhook.state import Store
from tests.helpers import bridge_nic, domain_xml

pytestmark = [pytest.mark.root, pytest.mark.security]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAN = "02:00:00:00:00:fe"
GUEST = "52:54:00:00:21:01"
OTHER = "52:54:00:00:21:02"
SECRET = b"root only\n"


def _sysctl(name):
    try:
        with open("/proc/sys/fs/" + name) as fh:
            return int(fh.read())
    except OSError:
        return None


def symlinks_followed():
    """Skip a symlink case where the kernel would refuse the link itself (the attack needs the sysctls off)."""
    values = {name: _sysctl(name) for name in ("protected_symlinks", "protected_regular")}
    if any(values.values()):
        pytest.skip("fs.protected_symlinks/protected_regular are on here (%s): the kernel itself would stop "
                    "this attack; it is meaningful only with them off, as on the development machine" % values)


def _free_id():
    for uid in range(64990, 60000, -1):
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            return uid
    raise RuntimeError("no free uid")


ATTACKER = _free_id()


def as_attacker(fn):
    """Run ``fn()`` in a forked child as the unprivileged ATTACKER uid; its JSON-able result, or the exception text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(ATTACKER)
            os.setuid(ATTACKER)
            out = ["ok", fn()]
        except BaseException as exc:  # the test reads the reason
            out = ["error", "%s: %s" % (exc.__class__.__name__, exc)]
        try:
            os.write(w, json.dumps(out).encode())
        except BaseException:
            status = 1
        os._exit(status)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks).decode())


@pytest.fixture
def base():
    """A directory the attacker can traverse (0755, root's), with ``att``, a directory the attacker owns."""
    # /tmp, not $TMPDIR: CI's temporary directory may be one an unprivileged user cannot traverse.
    path = tempfile.mkdtemp(prefix="sc-sec-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.chmod(path, 0o755)
    att = os.path.join(path, "att")
    os.mkdir(att, 0o755)
    os.chown(att, ATTACKER, ATTACKER)
    victim = os.path.join(path, "rootonly")
    os.mkdir(victim, 0o700)
    with open(os.path.join(victim, "secret"), "wb") as fh:
        fh.write(SECRET)
    os.chmod(os.path.join(victim, "secret"), 0o600)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def victim_intact(base):
    path = os.path.join(base, "rootonly", "secret")
    st = os.lstat(path)
    with open(path, "rb") as fh:
        return fh.read() == SECRET and stat.S_IMODE(st.st_mode) == 0o600 and stat.S_ISREG(st.st_mode)


@pytest.fixture
def lab():
    with Lab(prefix="sc") as the_lab:
        yield the_lab


# --- symlink writes --------------------------------------------------------------------------

def test_metrics_textfile_never_follows_a_planted_link(base):
    symlinks_followed()
    prom = os.path.join(base, "att", "prom")  # node_exporter's directory, not root's
    secret = os.path.join(base, "rootonly", "secret")
    pid = os.getpid()

    def plant():
        os.mkdir(prom, 0o755)
        names = [".fdbhook.prom.%d.tmp" % pid, "fdbhook.prom"] + [".fdbhook.prom.%d.tmp" % p for p in range(1, 200)]
        for name in names:
            os.symlink(secret, os.path.join(prom, name))
        return len(names)

    assert as_attacker(plant)[0] == "ok"
    write_textfile(os.path.join(prom, "fdbhook.prom"), b"fdbhook_up 1\n")
    assert victim_intact(base)
    st = os.lstat(os.path.join(prom, "fdbhook.prom"))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert open(os.path.join(prom, "fdbhook.prom"), "rb").read() == b"fdbhook_up 1\n"
    assert not [n for n in os.listdir(prom) if n.startswith(".tmp-")]

    # The directory itself swapped for a link to a root-only one: refused, nothing written there.
    def swap():
        os.rename(prom, prom + ".old")
        os.symlink(os.path.join(base, "rootonly"), prom)
        return True

    assert as_attacker(swap)[0] == "ok"
    with pytest.raises(OSError):
        write_textfile(os.path.join(prom, "fdbhook.prom"), b"fdbhook_up 1\n")
    assert sorted(os.listdir(os.path.join(base, "rootonly"))) == ["secret"] and victim_intact(base)


def _install_lock(directory):
    """install.sh's own take_install_lock (and die), run on ``directory``: (exit code, stderr)."""
    script = ('set -euo pipefail\n'
              'eval "$(sed -n \'/^die() {/p; /^take_install_lock() {/,/^}/p\' "$1")"\n'
              'take_install_lock "$2"\necho locked\n')
    proc = subprocess.run(["bash", "-c", script, "lock", os.path.join(REPO, "install.sh"), directory],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_install_lock_is_in_a_root_only_directory_and_never_through_a_link(base):
    symlinks_followed()
    with open(os.path.join(REPO, "install.sh")) as fh:
        text = fh.read()
    assert "/run/lock" not in text.replace("(/run/lock, /tmp)", "")  # no lock in a world-writable directory

    own = os.path.join(base, "run-fdbhook")
    code, out = _install_lock(own)
    assert code == 0 and "locked" in out, out
    st = os.lstat(own)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700 and os.path.isfile(os.path.join(own, "install.lock"))

    # The directory is a user's symlink to a root-only directory holding a file named install.lock.
    with open(os.path.join(base, "rootonly", "install.lock"), "wb") as fh:
        fh.write(SECRET)
    link = os.path.join(base, "att", "run-fdbhook")
    assert as_attacker(lambda: os.symlink(os.path.join(base, "rootonly"), link) or True)[0] == "ok"
    code, out = _install_lock(link)
    assert code != 0 and "is a symlink: refusing" in out and len(out.strip().splitlines()) == 1, out
    assert open(os.path.join(base, "rootonly", "install.lock"), "rb").read() == SECRET

    # The directory is the user's own.
    theirs = os.path.join(base, "att", "dir")
    assert as_attacker(lambda: os.mkdir(theirs, 0o755) or True)[0] == "ok"
    code, out = _install_lock(theirs)
    assert code != 0 and "is not root's: refusing" in out, out
    assert not os.path.exists(os.path.join(theirs, "install.lock"))


def _capture_config(spool, limit=16 * 1024 * 1024):
    return parse_config("[hook]\ncapture = yes\ncapture_dir = %s\ncapture_max_bytes = %d\n" % (spool, limit),
                        env={"FDBHOOK_STATE_DIR": "/nonexistent-sc"})


VNC_XML = (b"<domain type='kvm'><name>sc1</name><devices><graphics type='vnc' passwd='hunter2'/>"
           b"</devices></domain>")


def test_capture_spool_is_root_only_and_refuses_a_directory_someone_else_made(base):
    symlinks_followed()
    spool = os.path.join(base, "spool")
    capture(_capture_config(spool), "qemu", ["sc1", "start", "begin", "-"], VNC_XML)
    st = os.lstat(spool)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    files = os.listdir(spool)
    assert len(files) == 1 and stat.S_IMODE(os.lstat(os.path.join(spool, files[0])).st_mode) == 0o600

    def read_spool():
        for name in os.listdir(spool):
            with open(os.path.join(spool, name)) as fh:
                return fh.read()
        return ""

    result = as_attacker(read_spool)
    assert result[0] == "error" and "PermissionError" in result[1], result

    # A spool directory the attacker made (or a link they planted) is refused: no XML lands there.
    theirs = os.path.join(base, "att", "spool")
    assert as_attacker(lambda: os.mkdir(theirs, 0o777) or True)[0] == "ok"
    capture(_capture_config(theirs), "qemu", ["sc1", "start", "begin", "-"], VNC_XML)
    assert os.listdir(theirs) == []


def test_capture_trimming_never_deletes_through_a_link(base):
    symlinks_followed()
    rootonly = os.path.join(base, "rootonly")
    for name in ("a.json", "b.json"):
        with open(os.path.join(rootonly, name), "w") as fh:
            fh.write("{}" * 100)
    link = os.path.join(base, "att", "spool")
    assert as_attacker(lambda: os.symlink(rootonly, link) or True)[0] == "ok"
    capture(_capture_config(link, limit=1), "qemu", ["sc1", "start", "begin", "-"], VNC_XML)
    assert sorted(os.listdir(rootonly)) == ["a.json", "b.json", "secret"] and victim_intact(base)


def test_a_state_dir_that_is_a_link_is_refused_in_one_line_and_nothing_changes(lab, base):
    symlinks_followed()
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0")
    link = os.path.join(base, "att", "state")
    assert as_attacker(lambda: os.symlink(os.path.join(base, "rootonly"), link) or True)[0] == "ok"
    plain = os.path.join(base, "state")  # a link where only root could have put it (a misconfiguration)
    os.symlink(os.path.join(base, "rootonly"), plain)
    before = untouched(lab, "vnet0")
    xml = domain_xml([bridge_nic(mac=GUEST, dev="vnet0")], name="sc1")
    for state, words in ((link, "att: owned by uid %d, not root: refused" % ATTACKER),
                         (plain, "a symlink or not a directory: refused")):
        result = start(lab, state, xml)
        assert refused(result, words), result
        assert before and untouched(lab, "vnet0")
        assert sorted(os.listdir(os.path.join(base, "rootonly"))) == ["secret"]


# --- ports that are not the guest's ------------------------------------------------------------

def start(lab, state, xml, name="sc1", conf=""):
    config = parse_config("[manage]\nbridges = br0\n" + conf,
                          env={"FDBHOOK_STATE_DIR": state, "FDBHOOK_LIBVIRT_NETWORK_DIRS": "/nonexistent-sc"})
    with in_netns(lab.ns):
        return run_hook("qemu", [name, "start", "begin", "-"], xml, config=config)


def stop(lab, state, name="sc1", xml=b""):
    config = parse_config("[manage]\nbridges = br0\n",
                          env={"FDBHOOK_STATE_DIR": state, "FDBHOOK_LIBVIRT_NETWORK_DIRS": "/nonexistent-sc"})
    with in_netns(lab.ns):
        return run_hook("qemu", [name, "stopped", "end", "-"], xml, config=config)


def ports(lab):
    lab.add_bridge("br0")
    lab.add_veth("uplink", "wan", bridge="br0", mac=WAN)
    lab.add_tap("vnet0", bridge="br0")
    lab.add_tap("vnet1", bridge="br0")


def untouched(lab, dev):
    flags = lab.port_flags(dev)
    statics = [e for e in lab.fdb(dev=dev) if e["state"] == "static"]
    return flags["learning"] and flags["flood"] and not statics


def refused(result, *words):
    return result.code == 1 and result.stderr.count("\n") == 0 and all(w in result.stderr for w in words)


def test_target_dev_naming_the_bridge_itself_is_refused(lab, tmp_path):
    ports(lab)
    result = start(lab, str(tmp_path), domain_xml([bridge_nic(mac=GUEST, dev="br0")]))
    assert refused(result, "NIC net0", "port br0 is not on any bridge"), result  # a bridge is never a bridge's port
    assert not [e for e in lab.fdb(br="br0") if e["state"] == "static"]


def test_target_dev_naming_an_uplink_is_refused(lab, tmp_path):
    ports(lab)
    # An ethernet NIC's stand-in (this kernel has no dummy): a macvlan on the bridge.
    lab.ip("link", "add", "nic0", "link", "wan", "type", "macvlan", "mode", "bridge")
    lab.ip("link", "set", "nic0", "master", "br0")
    result = start(lab, str(tmp_path), domain_xml([bridge_nic(mac=GUEST, dev="nic0")]))
    assert refused(result, "nic0 is a macvlan device, not a tap or veth"), result
    assert untouched(lab, "nic0")
    # A veth uplink, named as one in the config.
    result = start(lab, str(tmp_path), domain_xml([bridge_nic(mac=GUEST, dev="uplink")]),
                   conf="uplinks = uplink bond*\n")
    assert refused(result, "uplink is an uplink ([manage] uplinks"), result
    assert untouched(lab, "uplink")


def test_another_guests_tap_is_refused_and_restored_when_its_guest_stops(lab, tmp_path):
    ports(lab)
    state = str(tmp_path)
    assert start(lab, state, domain_xml([bridge_nic(mac=GUEST, dev="vnet0")], name="sc-a"), name="sc-a").code == 0
    result = start(lab, state, domain_xml([bridge_nic(mac=OTHER, dev="vnet0")], name="sc-b"), name="sc-b")
    assert refused(result, "sc-b", "vnet0 belongs to domain qemu/sc-a"), result
    assert sorted(e["mac"] for e in lab.fdb(dev="vnet0") if e["state"] == "static") == [GUEST]
    stop(lab, state, name="sc-b")
    stop(lab, state, name="sc-a")
    assert untouched(lab, "vnet0")


def test_a_port_carrying_someone_elses_static_entry_is_refused(lab, tmp_path):
    ports(lab)
    lab.bridge("fdb", "add", "02:ad:00:00:00:01", "dev", "vnet0", "master", "static")
    result = start(lab, str(tmp_path), domain_xml([bridge_nic(mac=GUEST, dev="vnet0")]))
    assert refused(result, "vnet0 carries FDB entries that are not this NIC's (02:ad:00:00:00:01)"), result
    assert lab.port_flags("vnet0")["learning"]


def test_a_local_entry_is_never_taken_bridge_or_port_mac(lab, tmp_path):
    ports(lab)

    def refused_and_kept(mac, *words):
        result = start(lab, str(tmp_path), domain_xml([bridge_nic(mac=mac, dev="vnet0")]))
        assert refused(result, mac, *words), result
        local = [e for e in lab.fdb(br="br0") if e["mac"] == mac and e["state"] == "permanent"]
        assert local, "the local entry of %s must stay" % mac

    # The bridge's address as the kernel chose it (a port's: the lowest), then one set by the admin.
    refused_and_kept(lab.link("br0")["address"], "local")
    lab.ip("link", "set", "br0", "address", "02:b0:00:00:00:01")
    refused_and_kept("02:b0:00:00:00:01", "bridge br0's own address")
    refused_and_kept(lab.link("vnet0")["address"], "port vnet0's own address")
    assert untouched(lab, "vnet0")


def test_extra_macs_per_nic_are_capped(lab, tmp_path):
    ports(lab)
    extra = " ".join("02:00:00:%02x:%02x:01" % (i // 256, i % 256) for i in range(3000))
    meta = ("<metadata><fdb:fdb xmlns:fdb='urn:x-fdbhook:1'><fdb:interface mac='%s' extra-macs='%s'/>"
            "</fdb:fdb></metadata>" % (GUEST, extra))
    result = start(lab, str(tmp_path), domain_xml([bridge_nic(mac=GUEST, dev="vnet0")], metadata=meta))
    assert refused(result, "3000 extra MACs, more than [manage] max_extra_macs = 64"), result
    assert untouched(lab, "vnet0")
    few = " ".join("02:00:00:00:00:%02x" % i for i in range(1, 4))
    meta = meta.replace(extra, few)
    result = start(lab, str(tmp_path), domain_xml([bridge_nic(mac=GUEST, dev="vnet0")], metadata=meta),
                   conf="max_extra_macs = 2\n")
    assert refused(result, "3 extra MACs, more than [manage] max_extra_macs = 2"), result


def test_the_guests_own_ports_are_taken_libvirt_tap_and_lxc_veth(lab, tmp_path):
    lab.add_bridge("br0")
    lab.add_tap("vnet0", bridge="br0", mac="fe" + GUEST[2:])  # as libvirt makes a tap for GUEST
    lab.add_veth("vnet1", "ct1", bridge="br0", mac=OTHER)  # an LXC veth: random MAC on the host side
    xml = domain_xml([bridge_nic(mac=GUEST, dev="vnet0"), bridge_nic(mac=OTHER, dev="vnet1", alias="net1")])
    result = start(lab, str(tmp_path), xml)
    assert result.code == 0, result
    for dev, mac in (("vnet0", GUEST), ("vnet1", OTHER)):
        assert mac in [e["mac"] for e in lab.fdb(dev=dev) if e["state"] == "static"]
        assert not lab.port_flags(dev)["learning"]


HOSTILE = [
    ("ff:ff:ff:ff:ff:ff", "is multicast/broadcast"),
    ("01:00:5e:00:00:01", "is multicast/broadcast"),
    ("00:00:00:00:00:00", "is all-zero"),
    (WAN, "already has a static FDB entry on another port"),  # pinned on the uplink by an admin
    (OTHER, "already in use by domain qemu/sc-a"),  # another guest's
]


@pytest.mark.parametrize("mac, words", HOSTILE, ids=["broadcast", "multicast", "zero", "admin-static", "other-guest"])
def test_hostile_macs_are_still_refused_in_one_line(lab, tmp_path, mac, words):
    ports(lab)
    state = str(tmp_path)
    lab.bridge("fdb", "add", WAN, "dev", "uplink", "master", "static")  # an admin's static entry
    assert start(lab, state, domain_xml([bridge_nic(mac=OTHER, dev="vnet1")], name="sc-a"), name="sc-a").code == 0
    result = start(lab, state, domain_xml([bridge_nic(mac=mac, dev="vnet0")], name="sc-b"), name="sc-b")
    assert refused(result, "sc-b", words), result
    assert untouched(lab, "vnet0")


# --- names are data ----------------------------------------------------------------------------

def hook_env(base, tmp_path):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n")
    return dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
                FDBHOOK_LOG=os.path.join(base, "fdbhook.log"), FDBHOOK_LIBVIRT_NETWORK_DIRS="/nonexistent-sc",
                FDBHOOK_NO_DAEMON="1", PYTHONPATH=REPO)


def hook(lab, env, name, op, xml=b""):
    argv = lab.exec_argv([sys.executable, "-m", "fdbhook", "hook", "qemu", name, op, "begin", "-"])
    return subprocess.run(argv, input=xml, env=env, capture_output=True, timeout=60)


def test_a_name_with_surrounding_spaces_is_torn_down(lab, base, tmp_path):
    ports(lab)
    env = hook_env(base, tmp_path)
    name = "  sc vm  "
    xml = domain_xml([bridge_nic(mac=GUEST, dev="vnet0")], name=name)
    assert hook(lab, env, name, "start", xml).returncode == 0
    assert not lab.port_flags("vnet0")["learning"]
    assert os.path.exists(Store(env["FDBHOOK_STATE_DIR"]).path("qemu", name))
    assert hook(lab, env, name, "stopped", xml.replace(b"<target dev='vnet0'/>", b"")).returncode == 0
    assert untouched(lab, "vnet0")
    assert not os.listdir(os.path.join(env["FDBHOOK_STATE_DIR"], "domains"))


def test_a_newline_in_a_name_forges_no_log_line_and_the_log_is_root_adm_0640(lab, base, tmp_path):
    ports(lab)
    env = hook_env(base, tmp_path)
    name = "sc\nfdbhook[1]: forged"
    xml = domain_xml([bridge_nic(mac=GUEST, dev="vnet0")], name=name)
    assert hook(lab, env, name, "start", xml).returncode == 0
    with open(env["FDBHOOK_LOG"]) as fh:
        lines = fh.read().splitlines()
    assert lines and not [line for line in lines if line.startswith("fdbhook[1]: forged")]
    assert any("sc\\x0afdbhook[1]: forged" in line for line in lines)
    st = os.lstat(env["FDBHOOK_LOG"])
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0
    try:
        assert st.st_gid == grp.getgrnam("adm").gr_gid
    except KeyError:
        pass  # no adm group on this system: root's group
    result = as_attacker(lambda: open(env["FDBHOOK_LOG"]).read())
    assert result[0] == "error" and "PermissionError" in result[1], result


def test_a_log_path_that_is_a_planted_link_is_not_followed(lab, base, tmp_path):
    symlinks_followed()
    ports(lab)
    env = hook_env(base, tmp_path)
    env["FDBHOOK_LOG"] = os.path.join(base, "att", "fdbhook.log")
    secret = os.path.join(base, "rootonly", "secret")
    assert as_attacker(lambda: os.symlink(secret, env["FDBHOOK_LOG"]) or True)[0] == "ok"
    result = hook(lab, env, "sc1", "start", domain_xml([bridge_nic(mac=GUEST, dev="vnet0")]))
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    assert victim_intact(base)


# --- exposure ----------------------------------------------------------------------------------

def test_status_as_a_user_says_in_one_line_that_it_needs_root():
    def status():
        err = io.StringIO()
        sys.stderr, sys.stdout = err, io.StringIO()
        code = cli.main(["status"])
        return code, err.getvalue()

    result = as_attacker(status)
    assert result[0] == "ok", result
    code, err = result[1]
    assert code == 2 and err.count("\n") == 1 and "status needs root" in err and "Traceback" not in err, err


@pytest.fixture
def daemon(lab, tmp_path, base):
    """fdbhookd (no libvirt) in the lab's namespace: (Popen, socket path in a directory a user can reach)."""
    lab.add_bridge("br0")
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n[metrics]\ntextfile =\n")
    sock = os.path.join(base, "run", "fdbhookd.sock")
    env = dict(os.environ, FDBHOOK_CONF=str(conf), FDBHOOK_STATE_DIR=str(tmp_path / "state"),
               FDBHOOK_LOG=str(tmp_path / "log"), FDBHOOK_LIBVIRT_NETWORK_DIRS="/nonexistent-sc", PYTHONPATH=REPO)
    proc = subprocess.Popen(lab.exec_argv([sys.executable, "-m", "fdbhook", "daemon", "--no-libvirt",
                                           "--socket", sock]), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert poll(lambda: os.path.exists(sock) and ping(sock) == 0, timeout=60), "fdbhookd did not start"
        yield proc, sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ping(sock_path):
    """The daemon's answer code to a ping request, or None."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(30)
        sock.connect(sock_path)
        sock.sendall(encode_request("ping", [], b""))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return int(unpack(data, 3)[0])
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def proc_status(pid, key):
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def closed_by_peer(sock):
    try:
        sock.setblocking(False)
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def settled_threads(pid):
    """fdbhookd's thread count once it stops changing (the socket answers before every thread is spawned)."""
    counts = [proc_status(pid, "Threads")]
    while True:
        time.sleep(0.3)
        counts.append(proc_status(pid, "Threads"))
        if counts[-1] == counts[-2]:
            return counts[-1]


def test_daemon_bounds_idle_connections_and_large_requests(daemon):
    proc, path = daemon
    base_threads = settled_threads(proc.pid)
    idle = []
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)  # blocking: waits for room in the listen backlog
            idle.append(sock)
        # At most 256 handler threads; the rest closed at once, all of them after the read deadline.
        assert proc_status(proc.pid, "Threads") <= base_threads + 256 + 4
        assert poll(lambda: all(closed_by_peer(s) for s in idle), timeout=60, interval=0.2)
    finally:
        for sock in idle:
            sock.close()
    assert ping(path) == 0
    assert poll(lambda: proc_status(proc.pid, "Threads") <= base_threads + 4, timeout=60, interval=0.2), \
        (base_threads, proc_status(proc.pid, "Threads"))

    # 100 MB of garbage: cut off past the limit (8 MiB), memory handed back.
    rss = proc_status(proc.pid, "VmRSS")
    sent = 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    chunk = b"\xff" * (1 << 20)
    try:
        while sent < 100 * (1 << 20):
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()
    assert sent < 100 * (1 << 20)
    assert ping(path) == 0
    assert proc_status(proc.pid, "VmRSS") < rss + 32 * 1024  # kB: not the 100 MB, not the 8 MiB kept


def test_daemon_socket_refuses_an_unprivileged_client(daemon):
    _, path = daemon

    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(path)
        except OSError as exc:
            return "refused: %s" % exc.strerror
        try:  # the daemon may answer (and close) before reading a byte: a refusal
            sock.sendall(encode_request("ping", [], b""))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError as exc:
                return "answered %r, then %s" % (data, exc.strerror)
            if not chunk:
                return "answered %r" % data
            data += chunk

    result = as_attacker(connect)
    assert result[0] == "ok" and result[1].startswith("refused"), result
    st = os.stat(os.path.dirname(path))
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    # Past the directory and the socket's mode, the peer-credential check: no hook served to a user.
    os.chmod(os.path.dirname(path), 0o711)
    os.chmod(path, 0o777)
    try:
        result = as_attacker(connect)
    finally:
        os.chmod(path, 0o700)
        os.chmod(os.path.dirname(path), 0o700)
    assert result[0] == "ok" and "serves root only" in result[1], result


