"""Configuration: an INI file plus a few environment overrides.

No config file means nothing is managed: installing fdbhook must never change
a bridge until the admin names it.

A config that does not parse never stops fdbhook: fdbhookd keeps the last
good one it read (and saves its text as STATE_DIR/config.last-good, so a
restarted fdbhookd and the standalone hooks use it too); ``Config.fallback``
then says why, and ``fdbhook status`` shows it.
"""

import configparser
import fnmatch
import logging
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from fdbhook.errors import ConfigError

DEFAULT_CONF = "/etc/fdbhook/fdbhook.conf"
DEFAULT_STATE_DIR = "/run/fdbhook"
DEFAULT_NETWORK_DIRS = "/run/libvirt/network:/etc/libvirt/qemu/networks"
DEFAULT_METRICS_TEXTFILE = "/var/lib/prometheus/node-exporter/fdbhook.prom"  # node_exporter's textfile dir
LAST_GOOD = "config.last-good"

LOG = logging.getLogger(__name__)

_BOOL = {"1": True, "yes": True, "true": True, "on": True,
         "0": False, "no": False, "false": False, "off": False}

# Every key we read, so a typo in the file is an error, not a silent default.
KNOWN = {
    "manage": {"bridges", "networks", "sticky", "locked", "mab", "uplinks", "max_extra_macs",
               "hotplug_lockdown", "hotplug_predict"},
    "hook": {"on_error", "capture", "capture_dir", "capture_max_bytes"},
    "daemon": {"resync_interval"},
    "metrics": {"textfile", "listen"},
}


SECTION_KEYS = {"vlan_filtering", "restore_vlan_filtering", "vlan", "trunk", "extra_macs", "floating_macs",
                "locked", "mab", "sticky"}


@dataclass(frozen=True)
class Policy:
    """A [bridge NAME] or [network NAME] section."""

    vlan_filtering: str = "leave"  # on | off | leave
    restore_vlan_filtering: bool = True
    vlan: Optional[int] = None  # access VLAN (network sections only)
    trunk: Tuple[int, ...] = ()
    extra_macs: Tuple[str, ...] = ()  # static on every guest port of this bridge/network, besides its own MAC
    floating_macs: Tuple[str, ...] = ()  # move between guests (VRRP): left to learning, never static
    locked: Optional[bool] = None  # lock mode; None: [manage] locked decides
    mab: Optional[bool] = None  # report dropped source MACs (learning stays on); None: [manage] mab
    sticky: Optional[str] = None  # yes | no | auto; None: [manage] sticky


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class Config:
    path: str = DEFAULT_CONF
    exists: bool = False
    bridges: Tuple[str, ...] = ()
    networks: Tuple[str, ...] = ()
    sticky: str = "auto"  # yes | no | auto (off on bridges with a VXLAN port: EVPN must move MACs); see sticky_for
    locked: bool = False  # lock mode: guest ports locked to their own MACs
    mab: bool = False  # locked ports also report the source MACs they dropped (keeps learning on)
    uplinks: Tuple[str, ...] = ()  # port names (globs) never managed, whatever a domain's XML says
    max_extra_macs: int = 64  # extra MACs per NIC (metadata + sections); more is refused
    hotplug_lockdown: float = 30.0  # s a guest port may stay locked down at its join awaiting its NIC; 0 = off
    hotplug_predict: bool = True  # the lock-down also puts in the entry the port predicts (fdbhook.joined)
    on_error: str = "fail"  # fail | continue
    capture: bool = False
    capture_dir: str = "/var/lib/fdbhook/capture"
    capture_max_bytes: int = 16 * 1024 * 1024
    resync_interval: float = 60.0
    metrics_textfile: str = DEFAULT_METRICS_TEXTFILE  # "" = no textfile
    metrics_listen: str = ""  # ADDRESS:PORT of fdbhookd's own /metrics endpoint; "" = off
    state_dir: str = DEFAULT_STATE_DIR
    network_dirs: Tuple[str, ...] = tuple(DEFAULT_NETWORK_DIRS.split(":"))
    bridge_policies: Tuple[Tuple[str, Policy], ...] = ()
    network_policies: Tuple[Tuple[str, Policy], ...] = ()
    fallback: str = ""  # non-empty: the file at ``path`` is bad (this says why); this is the last good config

    def bridge_policy(self, bridge):
        """The [bridge NAME] section matching ``bridge`` (exact or glob)."""
        return _policy(self.bridge_policies, bridge)

    def network_policy(self, network):
        return _policy(self.network_policies, network)

    def sticky_setting(self, bridge, network=None):
        """(yes | no | auto, the section that says so): [network NAME], then [bridge NAME], then [manage]."""
        for kind, name, policy in (("network", network, self.network_policy(network) if network else None),
                                   ("bridge", bridge, self.bridge_policy(bridge))):
            if policy is not None and policy.sticky is not None:
                return policy.sticky, "[%s %s]" % (kind, name)
        return self.sticky, "[manage]"

    def sticky_for(self, bridge, network, vxlan_ports):
        """(sticky?, why) for guest entries on ``bridge``; ``vxlan_ports``: names of its VXLAN ports. Pure.

        ``auto`` (the default): off where the bridge has a VXLAN port, on
        elsewhere. FRR's zebra advertises a sticky FDB entry as a sticky EVPN
        MAC, which wins every best-path selection (RFC 7432 section 15.2): a
        migrated guest's MAC could never move to its new host.
        """
        setting, where = self.sticky_setting(bridge, network)
        if setting != "auto":
            return setting == "yes", "sticky = %s in %s" % (setting, where)
        if vxlan_ports:
            return False, ("sticky = auto (%s): off, %s has VXLAN port %s: EVPN must be able to move a migrated "
                           "guest's MAC, and a sticky MAC never moves" % (where, bridge, ", ".join(vxlan_ports)))
        return True, "sticky = auto (%s): on, %s has no VXLAN port: no other port can take a guest's MAC" % (
            where, bridge)

    def bridge_managed(self, bridge):
        """The glob that makes this bridge managed, or None."""
        return _match(self.bridges, bridge)

    def network_managed(self, network):
        return _match(self.networks, network)

    def uplink(self, port):
        """The [manage] uplinks glob naming this port (never a guest's), or None."""
        return _match(self.uplinks, port)


def _policy(policies, name):
    for pattern, policy in policies:
        if name and fnmatch.fnmatchcase(name, pattern):
            return policy
    return DEFAULT_POLICY


def _section_policy(path, parser, section, kind):
    items = parser[section]
    for key in items:
        if key not in SECTION_KEYS or (kind == "bridge" and key in ("vlan", "trunk")):
            raise ConfigError(path=path, reason="unknown key %r in [%s]" % (key, section))
    mode = items.get("vlan_filtering", "leave").strip().lower()
    if mode not in ("on", "off", "leave"):
        raise ConfigError(path=path, reason="[%s] vlan_filtering = %r (want on, off or leave)" % (section, mode))
    vlan, trunk = None, ()
    from fdbhook.domxml import parse_vlan_spec
    try:
        if items.get("vlan"):
            vids = parse_vlan_spec(items["vlan"])
            if len(vids) != 1:
                raise ValueError("vlan must be one VLAN id")
            vlan = vids[0]
        if items.get("trunk"):
            trunk = parse_vlan_spec(items["trunk"])
    except ValueError as exc:
        raise ConfigError(path=path, reason="[%s] bad VLAN spec: %s" % (section, exc)) from None
    restore = _bool(path, section, "restore_vlan_filtering", items.get("restore_vlan_filtering", "yes"))
    macs = {}
    for key in ("extra_macs", "floating_macs"):
        try:
            macs[key] = parse_mac_list(items.get(key, ""))
        except ValueError as exc:
            raise ConfigError(path=path, reason="[%s] %s: %s" % (section, key, exc)) from None
    flags = {key: _bool(path, section, key, items[key]) if key in items else None for key in ("locked", "mab")}
    sticky = _sticky(path, section, items["sticky"]) if "sticky" in items else None
    return Policy(vlan_filtering=mode, restore_vlan_filtering=restore, vlan=vlan, trunk=trunk, sticky=sticky,
                  **macs, **flags)


def _sticky(path, section, value):
    """'auto', or a boolean spelled any way _BOOL knows, as 'yes' / 'no'."""
    value = value.strip().lower()
    if value == "auto":
        return "auto"
    if value not in _BOOL:
        raise ConfigError(path=path, reason="[%s] sticky = %r is neither a boolean nor auto" % (section, value))
    return "yes" if _BOOL[value] else "no"


def parse_mac_list(text):
    """'00:00:5e:00:01:0a, 02:00:00:00:10:01' -> normalised tuple; ValueError names the bad one."""
    from fdbhook.domxml import _mac_list

    return _mac_list(text)


def _match(globs, name):
    if not name:
        return None
    for pattern in globs:
        if fnmatch.fnmatchcase(name, pattern):
            return pattern
    return None


def _bool(path, section, key, value):
    try:
        return _BOOL[value.strip().lower()]
    except KeyError:
        raise ConfigError(path=path, reason="[%s] %s = %r is not a boolean" % (section, key, value)) from None


def _number(path, section, key, value, kind):
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(path=path, reason="[%s] %s = %r is not a number" % (section, key, value)) from None
    if number <= 0:
        raise ConfigError(path=path, reason="[%s] %s must be positive" % (section, key))
    return number


def _seconds_or_off(path, section, key, value):
    """Seconds > 0, or 0 for "0" / "off" / "no"."""
    if (value or "").strip().lower() in ("0", "off", "no"):
        return 0.0
    return _number(path, section, key, value, float)


def parse_config(text, path=DEFAULT_CONF, env=None):
    """Build a Config from INI text (pure apart from ``env`` lookups)."""
    env = os.environ if env is None else env
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as exc:
        raise ConfigError(path=path, reason=str(exc).splitlines()[0]) from None
    bridge_policies, network_policies = [], []
    for section in parser.sections():
        kind, _, name = section.partition(" ")
        if kind in ("bridge", "network") and name.strip():
            policy = _section_policy(path, parser, section, kind)
            (bridge_policies if kind == "bridge" else network_policies).append((name.strip(), policy))
            continue
        if section not in KNOWN:
            raise ConfigError(path=path, reason="unknown section [%s]" % section)
        for key in parser[section]:
            if key not in KNOWN[section]:
                raise ConfigError(path=path, reason="unknown key %r in [%s]" % (key, section))

    def get(section, key, default=None):
        if parser.has_option(section, key):
            return parser.get(section, key)
        return default

    on_error = (get("hook", "on_error", "fail") or "fail").strip().lower()
    if on_error not in ("fail", "continue"):
        raise ConfigError(path=path, reason="[hook] on_error = %r (want fail or continue)" % on_error)
    values = dict(
        path=path,
        exists=True,
        bridges=tuple((get("manage", "bridges", "") or "").split()),
        networks=tuple((get("manage", "networks", "") or "").split()),
        sticky=_sticky(path, "manage", get("manage", "sticky", "auto")),
        locked=_bool(path, "manage", "locked", get("manage", "locked", "no")),
        mab=_bool(path, "manage", "mab", get("manage", "mab", "no")),
        uplinks=tuple((get("manage", "uplinks", "") or "").split()),
        max_extra_macs=_number(path, "manage", "max_extra_macs", get("manage", "max_extra_macs", "64"), int),
        hotplug_lockdown=_seconds_or_off(path, "manage", "hotplug_lockdown", get("manage", "hotplug_lockdown", "30")),
        hotplug_predict=_bool(path, "manage", "hotplug_predict", get("manage", "hotplug_predict", "yes")),
        on_error=on_error,
        capture=_bool(path, "hook", "capture", get("hook", "capture", "no")),
        capture_dir=get("hook", "capture_dir", Config.capture_dir),
        capture_max_bytes=_number(path, "hook", "capture_max_bytes",
                                  get("hook", "capture_max_bytes", str(Config.capture_max_bytes)), int),
        resync_interval=_number(path, "daemon", "resync_interval",
                                get("daemon", "resync_interval", "60"), float),
        **_metrics(path, get),
        bridge_policies=tuple(bridge_policies),
        network_policies=tuple(network_policies),
    )
    values.update(_env_overrides(env))
    return Config(**values)


def _metrics(path, get):
    """[metrics]: textfile (empty: none) and listen (ADDRESS:PORT; empty: no endpoint)."""
    textfile = (get("metrics", "textfile", DEFAULT_METRICS_TEXTFILE) or "").strip()
    if textfile and (not textfile.startswith("/") or not textfile.endswith(".prom")):
        raise ConfigError(path=path, reason="[metrics] textfile = %r (want an absolute path ending in .prom: "
                          "node_exporter reads only *.prom)" % textfile)
    listen = (get("metrics", "listen", "") or "").strip()
    if listen:
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(path=path, reason="[metrics] listen = %r: %s" % (listen, exc)) from None
    return {"metrics_textfile": textfile, "metrics_listen": listen}


def parse_listen(text):
    """'127.0.0.1:9311' / '[::1]:9311' / ':9311' -> (address, port); ValueError if malformed."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("want ADDRESS:PORT, e.g. 127.0.0.1:9311")
    return host.strip("[]") or "127.0.0.1", int(port)


def _env_overrides(env):
    out = {"state_dir": env.get("FDBHOOK_STATE_DIR") or DEFAULT_STATE_DIR}
    dirs = env.get("FDBHOOK_LIBVIRT_NETWORK_DIRS") or DEFAULT_NETWORK_DIRS
    out["network_dirs"] = tuple(d for d in dirs.split(":") if d)
    return out


def load_config(path=None, env=None):
    """Load the config named by ``path``, $FDBHOOK_CONF or the default.

    A missing file gives a Config that manages nothing.
    """
    env = os.environ if env is None else env
    path = path or env.get("FDBHOOK_CONF") or DEFAULT_CONF
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        return Config(path=path, exists=False, **_env_overrides(env))
    except OSError as exc:
        raise ConfigError(path=path, reason=exc.strerror or str(exc)) from None
    return parse_config(text, path, env)


def last_good_path(env=None):
    return os.path.join(_env_overrides(os.environ if env is None else env)["state_dir"], LAST_GOOD)


def save_last_good(config, env=None):
    """Keep the text of a config that parsed (STATE_DIR/config.last-good) unless it is already there."""
    path = last_good_path(env)
    try:
        with open(config.path, "rb") as handle:
            text = handle.read()
    except OSError:
        return False
    try:
        with open(path, "rb") as handle:
            if handle.read() == text:
                return True
    except OSError:
        pass
    from fdbhook.errors import StateError
    from fdbhook.state import _atomic_write
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        _atomic_write(path, text)
    except (OSError, StateError) as exc:
        LOG.warning("cannot save the last good config to %s: %s", path, exc)
        return False
    return True


def load_last_good(path, error, env=None):
    """The saved last good config, marked with ``error`` (why the file at ``path`` is not used), or None."""
    env = os.environ if env is None else env
    saved = last_good_path(env)
    try:
        with open(saved, encoding="utf-8") as handle:
            text = handle.read()
        config = parse_config(text, path, env)
    except (OSError, ValueError):
        return None
    return _with_fallback(config, "%s; using the last good config (saved in %s)" % (error, saved))


def _with_fallback(config, why):
    from dataclasses import replace
    return replace(config, fallback=why)


def load_config_or_last_good(path=None, env=None):
    """``load_config``; when the file is bad, the saved last good one (``fallback`` says so).

    Raises ConfigError only when the file is bad and no good one was ever saved.
    """
    env = os.environ if env is None else env
    path = path or env.get("FDBHOOK_CONF") or DEFAULT_CONF
    try:
        return load_config(path, env)
    except ConfigError as exc:
        config = load_last_good(path, str(exc), env)
        if config is None:
            raise
        return config


class ConfigCache:
    """``load_config``, read again only when the file changed (fdbhookd serves many hooks).

    The file's (inode, size, mtime) decide; a file that appears or goes is a
    change too. Thread-safe enough: a race loads the same file twice.
    A file that does not parse keeps the last good config (in memory, else
    the one saved in STATE_DIR/config.last-good, else "manage nothing");
    the error is logged once per change of the file and kept in ``fallback``.
    """

    def __init__(self, path=None, env=None):
        self.env = os.environ if env is None else env
        self.path = path or self.env.get("FDBHOOK_CONF") or DEFAULT_CONF
        self._stamp = self._config = None

    def _stat(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def get(self):
        """The config to use now; never raises."""
        stamp = self._stat()
        if self._config is None or stamp != self._stamp:
            self._config = self._load(self._config)
            self._stamp = stamp
        return self._config

    def _load(self, last):
        try:
            config = load_config(self.path, self.env)
        except ConfigError as exc:
            error = str(exc)
            if last is not None and last.exists:
                config = _with_fallback(last, "%s; still using the last good config, read before" % error)
            else:
                config = load_last_good(self.path, error, self.env)
            if config is None:
                config = Config(path=self.path, exists=False, fallback="%s; no good config was ever read: "
                                "nothing is managed" % error, **_env_overrides(self.env))
            LOG.error("%s", config.fallback)
            return config
        if config.exists:
            save_last_good(config, self.env)
        elif last is not None and last.exists:
            LOG.warning("config %s is gone: nothing is managed any more", self.path)
        return config
