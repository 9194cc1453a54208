"""Where fdbhook's log lines go: syslog/journal, a file, or stderr for the CLI."""

import logging
import logging.handlers
import os

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
