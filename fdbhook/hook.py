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

This module imports no pyroute2 or lxml at load time, so the no-op
operations cost only the interpreter start.
"""

import logging
import logging.handlers
import os
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


FALLBACK_LOG = "/var/log/fdbhook.log"


def setup_logging(verbose=False, hook=False):
    """Route fdbhook's log lines. Idempotent.

    $FDBHOOK_LOG names a file to append to; else syslog/journal when /dev/log
    exists; else /var/log/fdbhook.log (hosts without a syslog daemon: libvirt
    passes hooks no environment of ours, so this is where their lines go). A hook adds nothing to stderr: libvirt shows a failed hook's
    stderr to the user, and that must stay the one-line reason. The CLI also
    prints warnings (everything with -v) to stderr.
    """
    root = logging.getLogger("fdbhook")
    if getattr(root, "_fdbhook_configured", False):
        return
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    root._fdbhook_configured = True
    path = os.environ.get("FDBHOOK_LOG")
    handler = None
    if path:
        try:
            handler = logging.FileHandler(path)
        except OSError:
            handler = None
        fmt = "%(asctime)s fdbhook[%(process)d]: %(message)s"
    if handler is None and os.path.exists("/dev/log"):
        try:
            handler = logging.handlers.SysLogHandler(address="/dev/log")
        except OSError:
            handler = None
        fmt = "fdbhook[%(process)d]: %(message)s"
    if handler is None and not path:
        try:
            handler = logging.FileHandler(FALLBACK_LOG)
        except OSError:
            handler = None
        fmt = "%(asctime)s fdbhook[%(process)d]: %(message)s"
    if handler is not None:
        handler.setFormatter(logging.Formatter(fmt))
        root.addHandler(handler)
    if not hook:
        console = logging.StreamHandler()
        console.setLevel(logging.DEBUG if verbose else logging.WARNING)
        console.setFormatter(logging.Formatter("fdbhook: %(message)s"))
        root.addHandler(console)
    if not root.handlers:
        root.addHandler(logging.NullHandler())


NETWORK_APPLY_OPS = ("start", "started")


def run_hook(driver, argv, data, config=None, kernel=None, store=None, daemon=False, capture_it=True):
    """Serve one hook invocation. ``data`` is stdin (bytes). Never raises.

    ``daemon`` True when fdbhookd serves it: an incoming migration (the
    ``migrate`` hook on the destination) then gets its ports locked down at
    start/started but no FDB entries until the daemon sees the guest resume.
    Without the daemon nobody would add them later, so the standalone hook
    adds them at start/started.
    """
    from fdbhook.errors import FdbhookError

    if driver not in DRIVERS:
        return HookResult(2, stderr="fdbhook: unknown hook driver %r" % driver)
    if len(argv) < 2:
        return HookResult(2, stderr="fdbhook: hook %s needs OBJECT OP [SUBOP EXTRA]" % driver)
    obj, op = argv[0], argv[1]
    acts = op in NETWORK_APPLY_OPS if driver == "network" else (op in APPLY_OPS or op in TEARDOWN_OPS)
    try:
        if config is None:
            from fdbhook.config import load_config
            config = load_config()
        if config.capture and capture_it:
            capture(config, driver, argv, data)
        if daemon and driver == "qemu" and op == "migrate":
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


def capture(config, driver, argv, data):
    """Save one invocation (argv + stdin) to the spool for ``fdbhook replay``.

    The spool is bounded: the oldest files go once it exceeds
    ``capture_max_bytes``. A capture failure never fails the hook.
    """
    import json
    import time

    try:
        os.makedirs(config.capture_dir, mode=0o700, exist_ok=True)
        stamp = "%.6f" % time.time()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(argv[:2]))[:80]
        path = os.path.join(config.capture_dir, "%s-%d-%s-%s.json" % (stamp, os.getpid(), driver, safe))
        record = {"time": float(stamp), "driver": driver, "argv": list(argv)}
        try:
            record["stdin"] = data.decode("utf-8")
        except UnicodeDecodeError:
            import base64
            record["stdin_b64"] = base64.b64encode(data).decode()
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
        os.rename(tmp, path)
        _trim_spool(config.capture_dir, config.capture_max_bytes)
    except OSError as exc:
        LOG.warning("capture to %s failed: %s", config.capture_dir, exc)


def _trim_spool(directory, limit):
    entries = []
    for name in os.listdir(directory):
        if name.endswith(".json"):
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            entries.append((name, st.st_size))
    entries.sort()
    total = sum(size for _, size in entries)
    for name, size in entries:
        if total <= limit:
            break
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
        total -= size


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


def _failure(driver, obj, op, config, message):
    line = "fdbhook: %s" % " ".join(message.split())
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
        # The XML here names neither tap nor bridge; the record does.
        # argv's OBJECT is the domain name, so even broken XML tears down.
        store.clear_incoming(driver, obj)
        if not os.path.exists(store.path(driver, obj)):
            return HookResult(0)
        from fdbhook.engine import teardown_domain
        with _kernel(kernel) as k:
            teardown_domain(driver, obj, k, store)
        return HookResult(0)

    from fdbhook.domxml import parse_domain
    try:
        domain = parse_domain(data, driver=driver, what=obj)
    except Exception as exc:
        return _failure(driver, obj, op, config, str(exc))
    if not config.bridges and not config.networks and not os.path.exists(store.path(driver, domain.name)):
        LOG.debug("%s/%s %s: nothing managed (%s)", driver, obj, op, config.path)
        return HookResult(0)
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
