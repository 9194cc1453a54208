"""`fdbhook status` for a new user (issue 19, points 4-5): what is installed, running, configured, what next."""

import os
import subprocess

from fdbhook import firstrun

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def facts(**kw):
    base = {"libvirt": "9.0.0-4+deb12u2", "hook_dir": "/etc/libvirt/hooks",
            "hooks": {d: ("/etc/libvirt/hooks/" + d, 100.0) for d in firstrun.DRIVERS},
            "daemons": {"libvirtd": 200.0}, "bridges": {"br0": 2, "virbr0": 0},
            "manage_bridges": ["br0"], "manage_networks": [], "config": "/etc/fdbhook/fdbhook.conf",
            "config_exists": True, "man": True}
    base.update(kw)
    return firstrun.sentences(base)


def test_fresh_machine_without_libvirt_says_install_it_and_names_the_demo():
    text = "\n".join(facts(libvirt=None, hooks={}, daemons={}, manage_bridges=[]))
    assert "libvirt daemon: not installed" in text
    assert "next: install libvirt: apt install libvirt-daemon-system" in text and "fdbhook demo" in text
    assert "next: install the hooks" in text
    assert "next: name your bridges: 'bridges = br0' under [manage]" in text


def test_daemon_version_is_the_debian_package_not_the_binding():
    assert "libvirt daemon: Debian package 9.0.0-4+deb12u2" in facts()


def test_daemon_started_before_the_hooks_must_be_restarted():
    text = "\n".join(facts(daemons={"libvirtd": 50.0}))
    assert "libvirtd: running since BEFORE the hooks were installed" in text
    assert "next: restart libvirtd" in text and "./install.sh --restart" in text


def test_daemon_started_after_the_hooks_runs_them():
    lines = facts()
    assert "libvirtd: running since after the hooks were installed: it runs them" in lines
    assert "bridges matching 'br0': br0 (2 ports)" in lines
    assert lines[-1].startswith("next: start a guest with a NIC on a managed bridge")


def test_installed_but_not_running_says_how_to_start_without_init():
    text = "\n".join(facts(daemons={}))
    assert "libvirt daemon: not running" in text and "virtlogd -d && libvirtd -d" in text


def test_a_glob_matching_no_bridge_says_so():
    text = "\n".join(facts(manage_bridges=["br-*"]))
    assert "bridges matching 'br-*': none on this host" in text and "create one (ip link add" in text


def test_no_man_db_gets_a_hint():
    assert any("needs man-db" in line for line in facts(man=False))
    assert not any("man-db" in line for line in facts())


def test_package_version_reads_dpkg_query_and_tolerates_its_absence():
    def run(argv, **_):
        assert argv[:2] == ["dpkg-query", "-W"]
        return subprocess.CompletedProcess(argv, 0, "install ok installed\t11.3.0-3", "")

    def gone(argv, **_):
        raise FileNotFoundError("dpkg-query")

    assert firstrun.package_version("libvirt-daemon", run=run) == "11.3.0-3"
    assert firstrun.package_version("libvirt-daemon", run=gone) is None


def test_installed_hooks_finds_ours_in_main_or_d_dir_only(tmp_path):
    (tmp_path / "qemu").write_text("#!/bin/sh\n# someone else's\n")
    (tmp_path / "qemu.d").mkdir()
    (tmp_path / "qemu.d" / "50-fdbhook").write_text("#!/usr/bin/python3 -IS\n# fdbhook-hook: qemu\n")
    (tmp_path / "lxc").write_text("#!/usr/bin/python3 -IS\n# fdbhook-hook: lxc\n")
    found = firstrun.installed_hooks(str(tmp_path))
    assert {d: p for d, (p, _) in found.items()} == {"qemu": str(tmp_path / "qemu.d" / "50-fdbhook"),
                                                   "lxc": str(tmp_path / "lxc")}


def test_daemon_started_needs_the_pid_files_process_to_be_that_daemon(tmp_path):
    (tmp_path / "libvirtd.pid").write_text(str(os.getpid()))  # this process is not libvirtd
    assert firstrun.daemon_started("libvirtd", run_dir=str(tmp_path)) is None
    assert firstrun.daemon_started("virtqemud", run_dir=str(tmp_path)) is None


def test_config_template_says_sticky_auto_like_the_default():
    from fdbhook.config import load_config
    path = os.path.join(ROOT, "debian", "fdbhook.conf")
    text = open(path).read()
    assert "#sticky = auto" in text and "sticky = yes" not in text
    config = load_config(path)
    assert config.sticky == "auto" and config.bridges == () and config.networks == ()


def test_readme_commands_need_no_sudo():
    """A minimal Debian image has no sudo: the README's commands run as root as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = [line for line in text.splitlines() if line.lstrip().startswith(("sudo ", "$ sudo", "# sudo"))]
    assert commands == []


def test_install_sh_build_deps_are_debian_controls():
    """install.sh installs exactly the package's Build-Depends before dpkg-buildpackage -d."""
    import re
    control = open(os.path.join(ROOT, "debian", "control")).read()
    field = re.search(r"^Build-Depends:(.*?)^\S", control, re.M | re.S).group(1)
    wanted = {re.sub(r"\s*\(.*\)", "", dep).strip() for dep in field.split(",") if dep.strip()}
    wanted = {"debhelper" if dep == "debhelper-compat" else dep for dep in wanted}
    line = re.search(r'^BUILD_DEPS="([^"]*)"', open(os.path.join(ROOT, "install.sh")).read(), re.M).group(1)
    assert set(line.split()) == wanted | {"dpkg-dev"}


def _install_sh(*args):
    return subprocess.run(["bash", os.path.join(ROOT, "install.sh")] + list(args), capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})


def test_install_sh_default_is_the_package_and_dry_run_changes_nothing():
    out = _install_sh("--dry-run", "--bridges", "br0")
    assert out.returncode == 0, out.stderr
    assert "dpkg-buildpackage -us -uc -b -d" in out.stdout and "apt-get install" in out.stdout
    assert "would set bridges='br0'" in out.stdout and "dry run: nothing changed" in out.stdout


def test_install_sh_venv_options_need_venv_one_line_error():
    out = _install_sh("--dry-run", "--no-apt", "--bindir", "/opt/x")
    assert out.returncode == 1 and "--no-apt, --bindir: only with --venv" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = _install_sh("--venv", "--deb", "/nonexistent.deb", "--dry-run")
    assert out.returncode == 1 and "--deb and --venv exclude each other" in out.stderr
