"""Shared pytest set-up: test tiers, the host leak guard and the lab fixture."""

import json
import os
import subprocess

import pytest

ROOT_SKIP_REASON = "needs root (CAP_NET_ADMIN)"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "root: needs root (CAP_NET_ADMIN); kernel tier in network namespaces"
    )
    config.addinivalue_line("markers", "libvirt: needs a real libvirtd (system tier)")
    config.addinivalue_line(
        "markers", "fullkernel: boots a distribution kernel under virtme-ng"
    )
    config.addinivalue_line("markers", "security: issue 21's attacks (kernel tier; root, with a throwaway unprivileged uid)")
    config.addinivalue_line("markers", "systemd: boots a Debian container with systemd as PID 1 (systemd-nspawn)")
    config.addinivalue_line("markers", "package: builds the .deb; lintian; install/upgrade/purge on mmdebstrap trees")


def is_root():
    return os.geteuid() == 0


def pytest_runtest_setup(item):
    if item.get_closest_marker("root") is not None and not is_root():
        pytest.skip(ROOT_SKIP_REASON)


def _ip_json(*args):
    try:
        out = subprocess.run(
            ["ip", "-j", *args], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return json.loads(out) if out.strip() else []


def _host_snapshot():
    """Names of links, bridges and named netns in the test process's netns."""
    links = _ip_json("link", "show")
    bridges = _ip_json("link", "show", "type", "bridge")
    netns = _ip_json("netns", "list")
    if links is None or bridges is None or netns is None:
        return None
    # iproute2 prints [{}] rather than [] for an empty filtered list.
    return {
        "links": {link["ifname"] for link in links if "ifname" in link},
        "bridges": {link["ifname"] for link in bridges if "ifname" in link},
        "netns": {ns["name"] for ns in netns if "name" in ns},
    }


def _leaks(before):
    now = _host_snapshot()
    if now is None:
        return {}
    return {
        kind: sorted(now[kind] - before[kind])
        for kind in before
        if now[kind] - before[kind]
    }


@pytest.fixture(scope="session", autouse=True)
def host_leak_guard():
    """Fail the run if the tests left links, bridges or namespaces on the host.

    FDBHOOK_LEAK_GUARD=0 turns it off, for a developer running tiers while
    other labs come and go on the same machine (never in tests/run)."""
    if os.environ.get("FDBHOOK_LEAK_GUARD") == "0":
        yield
        return
    before = _host_snapshot()
    yield
    if before is None:
        return
    # Namespace teardown is asynchronous in the kernel (a veth whose peer
    # lived in a deleted netns vanishes a little later): allow a grace period.
    from fdbhook.lab import poll

    leaked = {}

    def clean():
        leaked.clear()
        leaked.update(_leaks(before))
        return not leaked

    if not poll(clean, timeout=3.0, interval=0.1):
        pytest.fail("tests leaked onto the host: %s" % leaked, pytrace=False)


@pytest.fixture
def lab():
    """A fresh Lab (its own network namespace), deleted after the test."""
    if not is_root():
        pytest.skip(ROOT_SKIP_REASON)
    from fdbhook.lab import Lab

    with Lab() as the_lab:
        yield the_lab
