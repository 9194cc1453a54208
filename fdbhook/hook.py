"""The libvirt hook contract, and nothing else.

libvirtd runs /etc/libvirt/hooks/DRIVER with argv ``OBJECT OP SUBOP EXTRA``
and the domain XML on stdin, and waits. What we promise it:

* qemu/lxc start, started, reconnect: apply (reconnect also heals drift);
  exit 1 with a one-line reason on stderr when a managed NIC cannot be
  managed (libvirt then refuses to start the guest), unless
  ``[hook] on_error = continue``.
* stopped, release: tear down from our records; always exit 0.
* prepare, restore, attach, migrate and anything else: do nothing, exit 0,
  print nothing (for migrate/restore an empty stdout means "keep the XML").
* never call back into libvirt: libvirtd is blocked on us.
* a guest that is none of ours always starts: ``maybe_ours`` decides from
  the config, the records and the raw XML bytes, before anything that can
  fail parses them (no config at all: exit 0 for any input).

This module imports no pyroute2 or lxml at load time, so the no-op
operations cost only the interpreter start.
"""

import logging
import os
import re
import sys
from dataclasses import dataclass

LOG = logging.getLogger(__name__)

APPLY_OPS = ("start", "started", "reconnect")
TEARDOWN_OPS = ("stopped", "release")
DRIVERS = ("qemu", "lxc", "network")


@dataclass(frozen=True)
class HookResult:
    code: int
    stdout: str = ""
    stderr: str = ""  # one line, or empty


NETWORK_APPLY_OPS = ("start", "started")

# Attribute values that can name a bridge or a network in domain XML:
# <source bridge='..'/>, <source network='..' bridge='..'/>.
_NAMES = re.compile(rb"""\b(bridge|network)\s*=\s*(?:'([^']*)'|"([^"]*)")""")
# A type='ethernet' NIC is managed by the bridge its tap is on in the kernel,
# which the XML does not name; a port may also sit on another bridge than
# its XML says. Such NICs are read from /sys (a symlink, no netlink).
_ETHERNET = re.compile(rb"""\btype\s*=\s*(?:'ethernet'|"ethernet")""")
_TARGETS = re.compile(rb"""<target\s+dev\s*=\s*(?:'([^'/]*)'|"([^"/]*)")""")


def _kernel_bridge(dev):
    try:
        return os.path.basename(os.readlink("/sys/class/net/%s/master" % dev))
    except (OSError, ValueError):
        return None


def xml_names(data):
    """{"bridge": {...}, "network": {...}} named anywhere in the raw XML; None if a value hides behind '&'."""
    out = {"bridge": set(), "network": set()}
    for match in _NAMES.finditer(data or b""):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        if b"&" in value:
            return None  # an entity or character reference: only a parser can say
        out[match.group(1).decode()].add(value.decode("utf-8", "replace"))
    return out


def maybe_ours(config, driver, obj, data, store_path_exists):
    """Could this domain hook concern anything fdbhook manages? Decided without parsing the XML.

    ``store_path_exists``: does a record of ``obj`` exist (then it is ours:
    its NICs may need pruning). Otherwise only a managed bridge or network
    named in the XML bytes makes it ours.
    """
    if store_path_exists:
        return True
    if not config.exists or (not config.bridges and not config.networks):
        return False
    names = xml_names(data)
    if names is None:
        return True
    if any(config.bridge_managed(b) for b in names["bridge"]):
        return True
    if config.networks and any(config.network_managed(n) for n in names["network"]):
        return True
    if _ETHERNET.search(data or b""):
        return True
    for match in _TARGETS.finditer(data or b""):
        dev = (match.group(1) if match.group(1) is not None else match.group(2)).decode("utf-8", "replace")
        bridge = _kernel_bridge(dev) if dev and dev not in (".", "..") else None
        if bridge and config.bridge_managed(bridge):
            return True
    # A network's bridge may be managed too ([manage] bridges naming virbr*): the
    # stopped-guest XML at prepare/start names the network only.
    if config.bridges and names["network"]:
        return True
    return False


def run_hook(driver, argv, data, config=None, kernel=None, store=None, daemon=False, capture_it=True):
    """Serve one hook invocation. ``data`` is stdin (bytes). Never raises.

    ``daemon`` True when fdbhookd serves it: an incoming migration (the
    ``migrate`` hook on the destination) then gets its ports locked down at
    start/started but no FDB entries until the daemon sees the guest resume.
    Without the daemon nobody would add them later, so the standalone hook
    adds them at start/started. The standalone fallback of a daemon that
    runs but did not answer in time (busy) passes ``daemon`` True: it does
    exactly what fdbhookd would (fdbhookd adds the entries at RESUMED).
    The ``migrate`` hook marks the incoming migration in both cases.
    """
    from fdbhook.errors import ConfigError, FdbhookError

    if driver not in DRIVERS:
        return HookResult(2, stderr="fdbhook: unknown hook driver %r" % driver)
    if len(argv) < 2:
        return HookResult(2, stderr="fdbhook: hook %s needs OBJECT OP [SUBOP EXTRA]" % driver)
    obj, op = argv[0], argv[1]
    acts = op in NETWORK_APPLY_OPS if driver == "network" else (op in APPLY_OPS or op in TEARDOWN_OPS)
    try:
        if config is None:
            from fdbhook.config import DEFAULT_CONF, load_config_or_last_good
            if not os.path.exists(os.environ.get("FDBHOOK_CONF") or DEFAULT_CONF) and not acts:
                return HookResult(0)  # no config: nothing to mark or capture
            try:
                config = load_config_or_last_good()
            except ConfigError as exc:
                # No good config was ever read: nothing is managed; records still tear down.
                LOG.error("%s/%s %s: %s; no good config was ever saved: nothing is managed", driver, obj, op, exc)
                from fdbhook.config import Config, _env_overrides
                config = Config(exists=False, fallback=str(exc), **_env_overrides(os.environ))
            if config.fallback:
                LOG.warning("%s/%s %s: %s", driver, obj, op, config.fallback)
        if config.capture and capture_it:
            from fdbhook.capture import capture
            capture(config, driver, argv, data)
        if driver == "qemu" and op == "migrate" and config.exists:
            from fdbhook.state import Store
            (store or Store(config.state_dir)).mark_incoming(driver, obj)
            LOG.info("%s/%s: incoming migration: entries wait for the guest to resume", driver, obj)
        if not acts:
            return HookResult(0)
        if driver == "network":
            return _serve_network(obj, op, data, config, kernel, store)
        return _serve(driver, obj, op, data, config, kernel, store, daemon)
    except FdbhookError as exc:
        if not acts:
            LOG.error("%s/%s %s: %s", driver, obj, op, exc)
            return HookResult(0)
        return _failure(driver, obj, op, config, str(exc))
    except Exception as exc:  # a bug: still one line, never a traceback to libvirt
        LOG.exception("%s/%s %s: internal error", driver, obj, op)
        if not acts:
            return HookResult(0)
        return _failure(driver, obj, op, config, "internal error: %s: %s" % (exc.__class__.__name__, exc))


def _serve_network(name, op, data, config, kernel, store):
    """Network hook: bridge-level set-up of a managed network at start/started.

    port-created/port-deleted are deliberately ignored: the tap does not
    exist yet at port-created, and a hook must never wait for it (libvirtd
    is blocked on us); the qemu/lxc hooks and the daemon manage the port.
    """
    from fdbhook.domxml import parse_network
    from fdbhook.engine import ensure_bridge_policy
    from fdbhook.state import Store

    if not config.network_managed(name):
        return HookResult(0)
    net = parse_network(data, what=name)
    if net.mac_table_manager == "libvirt":
        LOG.info("network/%s: libvirt manages this MAC table itself (macTableManager='libvirt'); left alone", name)
        return HookResult(0)
    if not net.bridge:
        return HookResult(0)
    store = store or Store(config.state_dir)
    with _kernel(kernel) as k:
        link = k.by_name(net.bridge)
        if link is None:
            if op == "started":
                LOG.warning("network/%s: bridge %s does not exist at %s", name, net.bridge, op)
            return HookResult(0)
        with store.lock():
            note = ensure_bridge_policy(k, store, config, net.bridge, link.ifindex, name)
    if note:
        LOG.info("network/%s: %s", name, note)
    return HookResult(0)


def _xml_name(data, driver, obj):
    """The domain's canonical name: the XML's <name> as written; argv's OBJECT if the XML has none."""
    try:
        from fdbhook.domxml import parse_domain
        return parse_domain(data, driver=driver, what=obj).name
    except Exception:
        return obj


def _failure(driver, obj, op, config, message):
    from fdbhook.logsetup import escape_controls

    line = "fdbhook: %s" % escape_controls(" ".join(message.split()))
    if op in TEARDOWN_OPS:
        LOG.error("%s/%s %s: %s", driver, obj, op, message)
        return HookResult(0)
    if config is not None and config.on_error == "continue":
        LOG.error("%s/%s %s: %s (on_error=continue)", driver, obj, op, message)
        return HookResult(0)
    LOG.error("%s/%s %s: %s", driver, obj, op, message)
    return HookResult(1, stderr=line)


def _serve(driver, obj, op, data, config, kernel, store, daemon=False):
    from fdbhook.state import Store

    store = store or Store(config.state_dir)
    if op in TEARDOWN_OPS:
        # The XML here names neither tap nor bridge; the record does. The
        # record is keyed by the XML's <name> exactly (no stripping); argv's
        # OBJECT is the same string from libvirt, so even broken XML tears down.
        name = _xml_name(data, driver, obj)
        store.clear_incoming(driver, name)
        if not store.has_record(driver, name) and not store.has_intents() \
                and not store.has_pending_bridges():
            return HookResult(0)
        from fdbhook.engine import teardown_domain
        with _kernel(kernel) as k:
            teardown_domain(driver, name, k, store)
        return HookResult(0)

    if not maybe_ours(config, driver, obj, data, store.has_record(driver, obj)):
        LOG.debug("%s/%s %s: nothing of ours (%s)", driver, obj, op, config.path)
        return HookResult(0)
    from fdbhook.domxml import parse_domain
    try:
        domain = parse_domain(data, driver=driver, what=obj)
    except Exception as exc:
        return _failure(driver, obj, op, config, str(exc))
    from fdbhook.engine import apply_domain
    paused = True if daemon and store.is_incoming(driver, domain.name) else None
    with _kernel(kernel) as k:
        report = apply_domain(domain, config, k, store, paused=paused)
    if report.failures:
        return _failure(driver, obj, op, config, report.one_line())
    return HookResult(0)


class _kernel:
    """Use the given Kernel, or open (and close) one for this call."""

    def __init__(self, kernel):
        self._given = kernel
        self._own = None

    def __enter__(self):
        if self._given is not None:
            return self._given
        from fdbhook.kernel import Kernel
        self._own = Kernel()
        return self._own

    def __exit__(self, *exc):
        if self._own is not None:
            self._own.close()


def answer(driver, argv, data, verbose=False, capture=True, daemon=False):
    """Serve one hook call in this process and write libvirt's answer: the exit code.

    The standalone path of the installed hooks (fdbhook.client, when
    fdbhookd does not answer) and of ``fdbhook hook``/``replay``. stdout only
    for migrate/restore (empty: keep the XML), stderr only the one line.
    ``daemon`` True: fdbhookd runs but was busy; serve it with its semantics.
    """
    from fdbhook.logsetup import setup_logging

    # -v (manual replay) shows every log line on stderr as well.
    setup_logging(verbose=verbose, hook=not verbose)
    result = run_hook(driver, argv, data, capture_it=capture, daemon=daemon)
    if result.stdout:
        sys.stdout.write(result.stdout)
    if result.stderr:
        sys.stderr.write(result.stderr + "\n")
    return result.code
