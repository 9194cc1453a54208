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


def setup_logging(verbose=False, hook=False):
    """Route fdbhook's log lines. Idempotent.

    $FDBHOOK_LOG names a file to append to; else syslog/journal when /dev/log
    exists. A hook adds nothing to stderr: libvirt shows a failed hook's
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


def run_hook(driver, argv, data, config=None, kernel=None, store=None):
    """Serve one hook invocation. ``data`` is stdin (bytes). Never raises."""
    from fdbhook.errors import FdbhookError

    if driver not in DRIVERS:
        return HookResult(2, stderr="fdbhook: unknown hook driver %r" % driver)
    if len(argv) < 2:
        return HookResult(2, stderr="fdbhook: hook %s needs OBJECT OP [SUBOP EXTRA]" % driver)
    obj, op = argv[0], argv[1]
    if driver == "network" or (op not in APPLY_OPS and op not in TEARDOWN_OPS):
        return HookResult(0)
    try:
        return _serve(driver, obj, op, data, config, kernel, store)
    except FdbhookError as exc:
        return _failure(driver, obj, op, config, str(exc))
    except Exception as exc:  # a bug: still one line, never a traceback to libvirt
        LOG.exception("%s/%s %s: internal error", driver, obj, op)
        return _failure(driver, obj, op, config, "internal error: %s: %s" % (exc.__class__.__name__, exc))


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


def _serve(driver, obj, op, data, config, kernel, store):
    from fdbhook.config import load_config
    from fdbhook.state import Store

    if config is None:
        config = load_config()
    store = store or Store(config.state_dir)
    if op in TEARDOWN_OPS:
        # The XML here names neither tap nor bridge; the record does.
        # argv's OBJECT is the domain name, so even broken XML tears down.
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
    with _kernel(kernel) as k:
        report = apply_domain(domain, config, k, store)
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
