"""Fixtures of the system tier: libvirtd + fdbhook's installed hooks.

``sudo ./tests/run`` brings libvirtd up (tests/system/libvirtd-up.sh),
installs fdbhook with install.sh (which restarts libvirtd so that it finds the
hooks) and sets FDBHOOK_E2E_REQUIRED=1: anything missing is then a failure,
not a skip.

The hooks run inside libvirtd and inherit its environment, not ours, so the
test configuration goes into /etc/fdbhook/fdbhook.conf; the admin's file is
saved and put back afterwards. For the session the host's
net.ipv6.conf.default.disable_ipv6 is set to 1 (and restored): the bridges
and the taps libvirt creates would otherwise get an IPv6 link-local address
and send DAD/MLD/router solicitations onto the test bridges. (libvirt leaves
an LXC container's interfaces down when no address is configured, the
diskless QEMU guests have no OS and no option ROM.) So no IP at all.
"""

import os
import shutil
import tempfile

import pytest

from tests.system import libvirt_env as E

REQUIRED = os.environ.get("FDBHOOK_E2E_REQUIRED") == "1"
SPOOL_MAX = 96 * 1024
SYSCTLS = {"net.ipv6.conf.default.disable_ipv6": "1"}


def unavailable(reason):
    if REQUIRED:
        pytest.fail("%s (FDBHOOK_E2E_REQUIRED=1: tests/run set libvirt up, so this is a failure)" % reason,
                    pytrace=False)
    pytest.skip(reason)


FOREIGN_HOOK_MARK = "fdbhook-e2e-foreign-hook"


def install_hooks():
    """install.sh as an admin runs it again (no apt, no demo), restarting libvirtd if needed."""
    return E.run(os.path.join(E.REPO, "install.sh"), "--venv", "--no-apt", "--no-demo", "--restart", timeout=120)


def restore_hooks():
    """Undo test_beside_a_foreign_hook if it was killed half-way: fdbhook the main qemu hook again."""
    main = os.path.join(E.HOOK_DIR, "qemu")
    try:
        with open(main, encoding="utf-8", errors="replace") as handle:
            foreign = FOREIGN_HOOK_MARK in handle.read(512)
    except OSError:
        foreign = False
    if foreign:
        os.unlink(main)
        install_hooks()


def cleanup_leftovers():
    """Remove every object of this tier (also those of an earlier, killed run)."""
    restore_hooks()
    for uri in (E.QEMU, E.LXC):
        proc = E.virsh(uri, "list", "--all", "--name", check=False)
        for name in proc.stdout.split() if proc.returncode == 0 else ():
            if name.startswith(E.PFX):
                E.virsh(uri, "destroy", name, check=False)
                E.virsh(uri, "undefine", name, check=False)
    proc = E.virsh(E.QEMU, "net-list", "--all", "--name", check=False)
    for name in proc.stdout.split() if proc.returncode == 0 else ():
        if name.startswith(E.PFX):
            E.virsh(E.QEMU, "net-destroy", name, check=False)
            E.virsh(E.QEMU, "net-undefine", name, check=False)
    import json
    links = json.loads(E.run("ip", "-j", "link", "show").stdout or "[]")
    for link in links:
        if link["ifname"].startswith(E.PFX):
            E.run("ip", "link", "del", "dev", link["ifname"], check=False)
    if os.path.isdir(E.RECORD_DIR):
        for name in os.listdir(E.RECORD_DIR):
            if "-%s" % E.PFX in name:
                os.unlink(os.path.join(E.RECORD_DIR, name))


def config_text(spool, on_error="fail", extra=""):
    return ("# written by fdbhook's system tests (tests/system); the admin's file is put back afterwards\n"
            "[manage]\nbridges = %s-br*\nnetworks = %s-net*\n"
            "[hook]\non_error = %s\ncapture = yes\ncapture_dir = %s\ncapture_max_bytes = %d\n%s"
            % (E.PFX, E.PFX, on_error, spool, SPOOL_MAX, extra))


class Libvirt:
    """The module's libvirt set-up: bridges, network, config, spool.

    Module scope, not session: everything is removed as soon as the system
    tier is done, before the session's host leak guard looks (pytest tears
    session fixtures down in the reverse order of their last use).
    """

    def __init__(self, spool):
        self.spool = spool
        self.spool_max = SPOOL_MAX

    def configure(self, on_error="fail", extra=""):
        """Write the test config atomically (hooks read it on every call)."""
        tmp = E.CONF + ".fdbe2e-tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(config_text(self.spool, on_error, extra))
        os.rename(tmp, E.CONF)


def _check_install():
    hooks = E.hook_targets()
    missing = [d for d in ("qemu", "lxc", "network") if d not in hooks]
    if missing:
        unavailable("fdbhook's hooks are not installed for %s: run ./install.sh --restart" % ", ".join(missing))
    with open(hooks["qemu"], encoding="utf-8") as handle:
        interp = handle.readline()[2:].split()[0]
    if not os.access(interp, os.X_OK):
        unavailable("the hooks' interpreter %s does not exist: run ./install.sh" % interp)
    pkg = E.run(interp, "-I", "-c", "import fdbhook, os; print(os.path.dirname(fdbhook.__file__))").stdout.strip()
    differ = []
    tree = os.path.join(E.REPO, "fdbhook")
    for root, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".pyc"):
                continue
            rel = os.path.relpath(os.path.join(root, name), tree)
            try:
                with open(os.path.join(tree, rel), "rb") as a, open(os.path.join(pkg, rel), "rb") as b:
                    same = a.read() == b.read()
            except FileNotFoundError:
                same = False
            if not same:
                differ.append(rel)
    if differ:
        pytest.fail("the installed fdbhook (%s), which libvirtd's hooks run, differs from this tree in %s: "
                    "run ./install.sh" % (pkg, ", ".join(sorted(differ))), pytrace=False)
    pids = E.pids_of("libvirtd")
    if pids:
        newest = max(E.mtime_since_boot(p) for p in hooks.values())
        if min(E.process_start_since_boot(p) for p in pids) < newest - 0.05:
            pytest.fail("libvirtd started before the hooks were installed and does not know them: "
                        "run ./install.sh --restart", pytrace=False)
    return hooks


# What the tier changes on the host is saved to files first, so that a run
# that was killed is repaired by the next one: the admin's config (or the
# fact that there was none) and the sysctls.
SAVED = "/run/fdbhook-e2e-saved.json"


def _save_host_state():
    import json
    if os.path.exists(SAVED):  # an earlier run was killed: its originals count
        with open(SAVED, encoding="utf-8") as handle:
            return json.load(handle)
    saved = {"sysctl": {}, "conf": None, "conf_mode": None,
             "conf_dir_existed": os.path.isdir(os.path.dirname(E.CONF))}
    for key in SYSCTLS:
        path = E.sysctl_path(key)
        if os.path.exists(path):
            with open(path) as handle:
                saved["sysctl"][key] = handle.read().strip()
    if os.path.exists(E.CONF):
        with open(E.CONF, encoding="utf-8", errors="surrogateescape") as handle:
            saved["conf"] = handle.read()
        saved["conf_mode"] = os.stat(E.CONF).st_mode & 0o7777
    with open(SAVED + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(saved, handle)
    os.rename(SAVED + ".tmp", SAVED)
    for key, value in SYSCTLS.items():
        if key in saved["sysctl"]:
            with open(E.sysctl_path(key), "w") as handle:
                handle.write(value)
    return saved


def _restore_host_state(saved):
    if saved["conf"] is not None:
        tmp = E.CONF + ".fdbe2e-tmp"
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as handle:
            handle.write(saved["conf"])
        os.chmod(tmp, saved["conf_mode"])
        os.rename(tmp, E.CONF)
    else:
        try:
            os.unlink(E.CONF)
        except FileNotFoundError:
            pass
        if not saved["conf_dir_existed"]:
            try:
                os.rmdir(os.path.dirname(E.CONF))
            except OSError:
                pass
    for key, value in saved["sysctl"].items():
        with open(E.sysctl_path(key), "w") as handle:
            handle.write(value)
    os.unlink(SAVED)


@pytest.fixture(scope="module")
def lv():
    if os.geteuid() != 0:
        pytest.skip("needs root (libvirtd, bridges)")
    if shutil.which("virsh") is None:
        unavailable("virsh is not installed (tests/system/libvirtd-up.sh installs libvirt)")
    if E.virsh(E.QEMU, "uri", check=False, timeout=15).returncode != 0:
        unavailable("libvirtd does not answer on %s (start it with tests/system/libvirtd-up.sh)" % E.QEMU)
    _check_install()

    saved = _save_host_state()
    spool = None
    try:
        cleanup_leftovers()
        import glob
        for old in glob.glob(os.path.join(tempfile.gettempdir(), "fdbhook-e2e-spool-*")):
            shutil.rmtree(old, ignore_errors=True)  # of a killed earlier run
        spool = tempfile.mkdtemp(prefix="fdbhook-e2e-spool-")
        env = Libvirt(spool)
        os.makedirs(os.path.dirname(E.CONF), exist_ok=True)
        env.configure()
        for bridge in (E.BR, E.UM):
            E.run("ip", "link", "add", bridge, "type", "bridge")
            E.run("ip", "link", "set", bridge, "up")
        net_xml = ("<network><name>%s</name><bridge name='%s' stp='off' delay='0'/></network>"
                   % (E.NET, E.NET_BR))
        with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as handle:
            handle.write(net_xml)
            path = handle.name
        try:
            E.virsh(E.QEMU, "net-define", path)
        finally:
            os.unlink(path)
        E.virsh(E.QEMU, "net-start", E.NET)
        yield env
    finally:
        cleanup_leftovers()
        _restore_host_state(saved)
        if spool:
            shutil.rmtree(spool, ignore_errors=True)


@pytest.fixture
def config(lv):
    """The test config; a test may change it (lv.configure), it is reset after."""
    lv.configure()
    yield lv
    lv.configure()


@pytest.fixture(scope="module")
def lxc_ok(lv):
    proc = E.virsh(E.LXC, "uri", check=False, timeout=15)
    if proc.returncode != 0:
        unavailable("libvirt's LXC driver does not answer (%s): install libvirt-daemon-driver-lxc"
                    % proc.stderr.strip())
    return True


class Guests:
    """Domains a test defines; destroyed and undefined after it, whatever happened."""

    def __init__(self, lv):
        self.lv = lv
        self.defined = []  # (uri, name)

    def define(self, driver, name, nics, meta=""):
        uri = E.URIS[driver]
        xml = E.domain_xml(driver, name, nics, meta)
        with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as handle:
            handle.write(xml)
            path = handle.name
        try:
            E.virsh(uri, "define", path)
        finally:
            os.unlink(path)
        self.defined.append((uri, name))
        return name

    def start(self, driver, name, check=True):
        return E.virsh(E.URIS[driver], "start", name, check=check, timeout=120)

    def destroy(self, driver, name, check=True):
        return E.virsh(E.URIS[driver], "destroy", name, check=check, timeout=120)

    def cleanup(self):
        for uri, name in reversed(self.defined):
            E.virsh(uri, "destroy", name, check=False, timeout=120)
            E.virsh(uri, "undefine", name, check=False)


@pytest.fixture
def guests(config):
    g = Guests(config)
    try:
        yield g
    finally:
        g.cleanup()


@pytest.fixture
def ethernet_tap(lv):
    """A persistent tap on the managed bridge, for <interface type='ethernet'> managed='no'."""
    E.run("ip", "tuntap", "add", "dev", E.TAP, "mode", "tap")
    try:
        E.run("ip", "link", "set", E.TAP, "master", E.BR)
        E.run("ip", "link", "set", E.TAP, "up")
        yield E.TAP
    finally:
        E.run("ip", "link", "del", "dev", E.TAP, check=False)


@pytest.fixture
def foreign_port(lv):
    """A veth port of the managed bridge that somebody else uses (for static entries)."""
    a, b = E.FOREIGN
    E.run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    try:
        E.run("ip", "link", "set", a, "master", E.BR)
        E.run("ip", "link", "set", a, "up")
        E.run("ip", "link", "set", b, "up")
        yield a
    finally:
        E.run("ip", "link", "del", "dev", a, check=False)
