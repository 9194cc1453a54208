import pytest

from fdbhook.config import load_config, parse_config
from fdbhook.errors import ConfigError


@pytest.fixture
def lines():
    """Records of fdbhook.config."""
    from tests.helpers import LogRecords

    with LogRecords("fdbhook.config") as records:
        yield records


def test_no_file_manages_nothing(tmp_path):
    cfg = load_config(str(tmp_path / "missing.conf"), env={})
    assert not cfg.exists and cfg.bridges == () and cfg.networks == ()
    assert cfg.bridge_managed("br0") is None


def test_globs_and_defaults():
    cfg = parse_config("[manage]\nbridges = br0 br-*\nnetworks = def*\n", env={})
    assert cfg.bridge_managed("br-lan") == "br-*"
    assert cfg.bridge_managed("br1") is None
    assert cfg.network_managed("default") == "def*"
    assert cfg.on_error == "fail" and cfg.sticky == "auto"
    assert cfg.state_dir == "/run/fdbhook"
    assert cfg.network_dirs == ("/run/libvirt/network", "/etc/libvirt/qemu/networks")


def test_env_overrides():
    cfg = parse_config("", env={"FDBHOOK_STATE_DIR": "/tmp/s", "FDBHOOK_LIBVIRT_NETWORK_DIRS": "/a:/b"})
    assert cfg.state_dir == "/tmp/s" and cfg.network_dirs == ("/a", "/b")


@pytest.mark.parametrize("text,match", [
    ("[manage]\nbridgez = br0\n", "unknown key"),
    ("[mange]\nbridges = br0\n", "unknown section"),
    ("[hook]\non_error = explode\n", "on_error"),
    ("[manage]\nsticky = perhaps\n", "boolean"),
    ("[daemon]\nresync_interval = -1\n", "positive"),
    ("not an ini file", "test.conf"),
])
def test_bad_config_is_one_line_error(text, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(text, path="test.conf", env={})
    assert "\n" not in str(info.value)


def test_per_bridge_sections_are_accepted():
    cfg = parse_config("[manage]\nbridges = br0\n[bridge br0]\nvlan_filtering = on\n", env={})
    assert cfg.bridges == ("br0",)


def test_cache_keeps_last_good_config(tmp_path, lines):
    """Issue 18 item 4: a typo keeps the last good config (memory, then STATE/config.last-good) and says so."""
    import os

    from fdbhook.config import ConfigCache

    conf = tmp_path / "f.conf"
    env = {"FDBHOOK_STATE_DIR": str(tmp_path / "state")}
    conf.write_text("[manage]\nbridges = br0\n")
    cache = ConfigCache(str(conf), env=env)
    assert cache.get().bridges == ("br0",) and not cache.get().fallback
    assert os.path.exists(tmp_path / "state" / "config.last-good")
    conf.write_text("[manage]\nbridgez = br1\n")
    got = cache.get()
    assert got.bridges == ("br0",) and "unknown key 'bridgez'" in got.fallback
    assert sum("bridgez" in r.getMessage() for r in lines) == 1
    assert cache.get() is got  # unchanged file: not read (nor logged) again
    fresh = ConfigCache(str(conf), env=env).get()  # a restarted fdbhookd: from the saved copy
    assert fresh.bridges == ("br0",) and "config.last-good" in fresh.fallback
    conf.write_text("[manage]\nbridges = br2\n")
    assert cache.get().bridges == ("br2",) and not cache.get().fallback


def test_cache_bad_config_never_good_manages_nothing(tmp_path):
    from fdbhook.config import ConfigCache

    conf = tmp_path / "f.conf"
    conf.write_text("[manage\n")
    got = ConfigCache(str(conf), env={"FDBHOOK_STATE_DIR": str(tmp_path / "s")}).get()
    assert got.bridges == () and "nothing is managed" in got.fallback
