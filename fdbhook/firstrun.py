"""What `fdbhook status` tells a new user while nothing is managed yet.

``gather`` reads the machine (dpkg's database, /etc/libvirt/hooks, the
libvirt daemons' pid files and start times, the kernel's bridges through the
links ``status`` already read); ``sentences`` is pure: facts in, lines out,
ending with what to do next. Never calls libvirt: the daemon version is the
installed Debian package's, not the Python binding's.
"""

import fnmatch
import os
import subprocess
import time

HOOK_DIR = "/etc/libvirt/hooks"
DRIVERS = ("qemu", "lxc", "network")
MARKER = "fdbhook-hook"
DAEMONS = ("libvirtd", "virtqemud", "virtlxcd", "virtnetworkd")
# Debian packages that carry a libvirt daemon, first match wins.
DAEMON_PACKAGES = ("libvirt-daemon", "libvirt-daemon-system")


def package_version(package, run=subprocess.run):
    """The installed version of a Debian package, or None (no dpkg, not installed)."""
    try:
        out = run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                  capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    status, _, version = out.stdout.partition("\t")
    if out.returncode != 0 or not status.endswith(" installed"):
        return None
    return version.strip() or None


def _ours(path):
    try:
        with open(path, "rb") as handle:
            return MARKER.encode() in b"".join(handle.readline() for _ in range(5))
    except OSError:
        return False


def installed_hooks(hook_dir=HOOK_DIR):
    """{driver: (path, mtime)} of fdbhook's hooks (the main hook or DRIVER.d/50-fdbhook)."""
    out = {}
    for driver in DRIVERS:
        for path in (os.path.join(hook_dir, driver), os.path.join(hook_dir, driver + ".d", "50-fdbhook")):
            if _ours(path):
                out[driver] = (path, os.stat(path).st_mtime)
                break
    return out


def daemon_started(name, proc="/proc", run_dir="/run"):
    """Epoch seconds at which the running DAEMON (its pid file's process) started, or None."""
    try:
        with open(os.path.join(run_dir, name + ".pid")) as handle:
            pid = int(handle.read().split()[0])
        exe = os.readlink(os.path.join(proc, str(pid), "exe"))
        if os.path.basename(exe.replace(" (deleted)", "")) != name:
            return None
        with open(os.path.join(proc, str(pid), "stat")) as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open(os.path.join(proc, "uptime")) as handle:
            uptime = float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def gather(config, links, hook_dir=HOOK_DIR):
    """The facts ``sentences`` needs, from this machine. ``links``: kernel.links() as status read them."""
    libvirt = None
    for package in DAEMON_PACKAGES:
        libvirt = package_version(package)
        if libvirt:
            break
    by_index = {link.ifindex: link for link in links}
    bridges = {}
    for link in links:
        if link.kind == "bridge":
            bridges.setdefault(link.name, 0)
    for link in links:
        master = by_index.get(link.master) if link.master else None
        if master is not None and master.kind == "bridge":
            bridges[master.name] += 1
    running = {name: daemon_started(name) for name in DAEMONS}
    return {
        "libvirt": libvirt,
        "hook_dir": hook_dir,
        "hooks": installed_hooks(hook_dir),
        "daemons": {name: started for name, started in running.items() if started is not None},
        "bridges": bridges,
        "manage_bridges": list(config.bridges),
        "manage_networks": list(config.networks),
        "config": config.path,
        "config_exists": config.exists,
        "man": os.path.exists("/usr/bin/man"),
    }


def sentences(facts):
    """Lines for a new user, then the next steps (pure)."""
    lines, steps = [], []
    if facts["libvirt"]:
        lines.append("libvirt daemon: Debian package %s" % facts["libvirt"])
    else:
        lines.append("libvirt daemon: not installed (no libvirt-daemon package)")
        steps.append("install libvirt: apt install libvirt-daemon-system (or run 'fdbhook demo' to see what "
                     "fdbhook does on a throwaway bridge)")
    hooks = facts["hooks"]
    if hooks:
        lines.append("hooks: %s" % ", ".join("%s (%s)" % (d, p) for d, (p, _) in sorted(hooks.items())))
    else:
        lines.append("hooks: none of fdbhook's in %s" % facts["hook_dir"])
        steps.append("install the hooks: ./install.sh from the source, or apt install ./fdbhook_*.deb")
    newest = max((m for _, m in hooks.values()), default=None)
    if facts["daemons"]:
        for name, started in sorted(facts["daemons"].items()):
            if newest is None:
                continue
            if started > newest:
                lines.append("%s: running since after the hooks were installed: it runs them" % name)
            else:
                lines.append("%s: running since BEFORE the hooks were installed: it does not run them yet" % name)
                steps.append("restart %s (it looks for hooks only when it starts): ./install.sh --restart" % name)
    elif facts["libvirt"]:
        lines.append("libvirt daemon: not running")
        steps.append("start it: 'systemctl start libvirtd' (or, without an init system, 'virtlogd -d && "
                     "libvirtd -d' as root)")
    globs = facts["manage_bridges"]
    if not globs and not facts["manage_networks"]:
        lines.append("config %s: no bridge and no network named: nothing is managed" % facts["config"])
        steps.append("name your bridges: 'bridges = br0' under [manage] in %s (or ./install.sh --bridges br0)"
                     % facts["config"])
    matched = False
    for glob in globs:
        match = sorted(name for name in facts["bridges"] if fnmatch.fnmatchcase(name, glob))
        matched = matched or bool(match)
        if match:
            lines.append("bridges matching '%s': %s" % (glob, ", ".join(
                "%s (%d port%s)" % (name, facts["bridges"][name], "" if facts["bridges"][name] == 1 else "s")
                for name in match)))
        else:
            lines.append("bridges matching '%s': none on this host" % glob)
    if globs and not matched and not facts["manage_networks"]:
        steps.append("no bridge matches [manage] bridges: create one (ip link add br0 type bridge) or fix the "
                     "globs in %s" % facts["config"])
    for net in facts["manage_networks"]:
        lines.append("libvirt networks matching '%s': managed once a guest NIC on one starts" % net)
    if (globs or facts["manage_networks"]) and not steps:
        steps.append("start a guest with a NIC on a managed bridge or network: 'fdbhook status' then lists its port")
    if not facts["man"]:
        lines.append("man page: 'man fdbhook' needs man-db (apt install man-db); 'fdbhook manpage' prints it")
    return lines + ["next: " + step for step in steps]
