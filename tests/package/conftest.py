"""The package tier: fdbhook's .deb built from this tree (once per run), lintian, install/upgrade/purge.

Needs root, dpkg-buildpackage with debhelper, dh-python and bash-completion
(tests/run installs them), lintian, and mmdebstrap trees (tests/stacks.py).
FDBHOOK_PACKAGE_REQUIRED=1 (tests/run) turns a missing piece into a failure.
"""

import os
import shutil
import subprocess
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = os.environ.get("FDBHOOK_PACKAGE_REQUIRED") == "1"
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "dh_bash-completion")
UPGRADE_VERSION = "0.1.0+upgrade1"
UPGRADE_CONF_LINE = "# (changed by the package tier's upgrade build)"


def unavailable(reason):
    if REQUIRED:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _copy_tree(dest):
    """The work tree as a clean checkout has it (no .git, no caches): what CI's clone holds."""
    os.makedirs(dest)
    subprocess.run("tar -C %s --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=./build "
                   "--exclude=./dist --exclude='*.egg-info' --exclude=./bench/results -cf - . | tar -C %s -xf -"
                   % (REPO, dest), shell=True, check=True)


def _build(src):
    out = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b", "-d"], cwd=src, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        pytest.fail("dpkg-buildpackage failed:\n%s" % (out.stdout + out.stderr)[-4000:], pytrace=False)
    parent = os.path.dirname(src)
    debs = sorted(f for f in os.listdir(parent) if f.endswith("_all.deb"))
    changes = sorted(f for f in os.listdir(parent) if f.endswith(".changes"))
    assert len(debs) == 1 and len(changes) == 1, os.listdir(parent)
    return os.path.join(parent, debs[0]), os.path.join(parent, changes[0])


@pytest.fixture(scope="session")
def packages():
    """{'deb', 'changes', 'upgrade'}: this tree's package, and a rebuilt one with a newer version
    whose shipped conffile differs (what an upgrade with an admin-edited conffile meets)."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if os.environ.get("FDBHOOK_SKIP_PACKAGE") == "1":
        pytest.skip("FDBHOOK_SKIP_PACKAGE=1")
    missing = [tool for tool in BUILD_TOOLS if not shutil.which(tool)]
    if missing:
        unavailable("package tools missing: %s (apt install dpkg-dev debhelper dh-python bash-completion)"
                    % ", ".join(missing))
    work = tempfile.mkdtemp(prefix="fdbhook-pkg-")
    try:
        os.chmod(work, 0o755)  # apt's _apt user reads the .deb
        deb, changes = _build(_copy_tree_into(work, "first"))
        src2 = _copy_tree_into(work, "upgrade")
        with open(os.path.join(src2, "debian", "changelog")) as handle:
            old = handle.read()
        trailer = old[old.index("\n -- "):].split("\n\n")[0].strip("\n")
        with open(os.path.join(src2, "debian", "changelog"), "w") as handle:
            handle.write("fdbhook (%s) unstable; urgency=medium\n\n  * Upgrade test build.\n\n%s\n\n%s"
                         % (UPGRADE_VERSION, trailer, old))
        with open(os.path.join(src2, "debian", "fdbhook.conf"), "a") as handle:
            handle.write(UPGRADE_CONF_LINE + "\n")
        upgrade, _ = _build(src2)
        yield {"deb": deb, "changes": changes, "upgrade": upgrade}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _copy_tree_into(work, name):
    parent = os.path.join(work, name)
    os.makedirs(parent)
    src = os.path.join(parent, "src")
    _copy_tree(src)
    return src
