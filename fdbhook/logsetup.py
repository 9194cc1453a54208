"""Where fdbhook's log lines go: the journal, syslog, a file, or stderr for the CLI."""

import logging
import logging.handlers
import os
import re

FALLBACK_LOG = "/var/log/fdbhook.log"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "fdbhook"

# One MESSAGE_ID per kind of per-NIC line (the NicResult status), fixed for
# good: `journalctl MESSAGE_ID=...` finds every port fdbhook changed, failed
# on, skipped or released, whatever the wording of the human line.
MESSAGE_IDS = {
    "changed": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c10",
    "unchanged": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c11",
    "planned": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c12",
    "skipped": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c13",
    "failed": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c14",
    "held": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c15",
    "rolled back": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c16",
    "removed": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c17",
    "gone": "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c18",
}
OTHER_MESSAGE_ID = "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c1f"


def nic_fields(driver, domain, alias, mac, port, bridge, action, status):
    """``extra=`` for a per-NIC log line: journal fields (systemd.journal.JournalHandler sends every
    ``extra=`` field; other handlers ignore them)."""
    fields = {
        "FDBHOOK_DRIVER": driver,
        "FDBHOOK_DOMAIN": domain,
        "FDBHOOK_NIC": alias,
        "FDBHOOK_MAC": mac,
        "FDBHOOK_PORT": port,
        "FDBHOOK_BRIDGE": bridge,
        "FDBHOOK_ACTION": action,
        "FDBHOOK_RESULT": status,
        "MESSAGE_ID": MESSAGE_IDS.get(status, OTHER_MESSAGE_ID),
    }
    return {key: str(value) for key, value in fields.items() if value}


# C0 and C1 controls, DEL, and the Unicode line/paragraph separators: a name
# from a domain's XML ("a\nfdbhook[1]: forged") must not start a log line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text):
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN``): one line, always."""
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 0x100
                        else "\\u%04x" % ord(m.group()), text)


class SafeFormatter(logging.Formatter):
    """A Formatter whose line never holds a control character (a traceback after it keeps its lines)."""

    def formatMessage(self, record):
        return escape_controls(super().formatMessage(record))


def _adm_gid():
    """Debian's group for reading logs (0640 root:adm), or None."""
    if os.geteuid() != 0:
        return None
    try:
        import grp
        return grp.getgrnam("adm").gr_gid
    except (ImportError, KeyError):
        return None


class SafeFileHandler(logging.FileHandler):
    """A log file opened through fdbhook.safefile: never through a link, created 0640 root:adm."""

    def _open(self):
        from fdbhook import safefile

        fd = safefile.open_append(self.baseFilename, mode=0o640, group=_adm_gid())
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=getattr(self, "errors", None))


class JournalHandler(logging.Handler):
    """Native journald lines through python3-systemd's ``systemd.journal.JournalHandler``
    (MESSAGE, PRIORITY, CODE_*, LOGGER and every ``extra=`` field, SYSLOG_IDENTIFIER=fdbhook).

    ``systemd.journal`` is imported at the first line actually logged, never
    before: an inert hook invocation logs nothing and must not pay for it.
    Without python3-systemd every line goes to syslog (/dev/log) as before.
    """

    sender = None  # systemd.journal.send unless set (tests)

    def __init__(self):
        super().__init__()
        self._target = None

    def emit(self, record):
        try:
            if self._target is None:
                self._target = self._open()
            self._target.emit(record)
        except Exception:
            self.handleError(record)

    def _open(self):
        try:
            from systemd import journal
        except ImportError:
            fallback = _syslog_handler() or logging.NullHandler()
            fallback.setFormatter(SafeFormatter("fdbhook[%(process)d]: %(message)s"))
            return fallback
        handler = journal.JournalHandler(sender_function=self.sender or journal.send, SYSLOG_IDENTIFIER=IDENTIFIER)
        handler.setFormatter(self.formatter)
        return handler


def _syslog_handler():
    if not os.path.exists("/dev/log"):
        return None
    try:
        return logging.handlers.SysLogHandler(address="/dev/log")
    except OSError:
        return None


def journald_running():
    return os.path.exists(JOURNAL_SOCKET)


def _stderr_is_journal():
    """systemd connected our stderr to the journal (JOURNAL_STREAM): a console copy would log twice."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
        return stream == "%d:%d" % (st.st_dev, st.st_ino)
    except OSError:
        return False


def setup_logging(verbose=False, hook=False):
    """Route fdbhook's log lines. Idempotent.

    $FDBHOOK_LOG names a file to append to; else the journal (with
    structured fields) where journald runs; else syslog when /dev/log
    exists; else /var/log/fdbhook.log (hosts without a syslog daemon:
    libvirt passes hooks no environment of ours, so this is where their
    lines go). A hook adds nothing to stderr: libvirt shows a failed hook's
    stderr to the user, and that must stay the one-line reason. The CLI also
    prints warnings (everything with -v) to stderr, unless stderr is the
    journal already (fdbhookd under systemd).
    """
    root = logging.getLogger("fdbhook")
    if getattr(root, "_fdbhook_configured", False):
        return
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    root._fdbhook_configured = True
    path = os.environ.get("FDBHOOK_LOG")
    handler = None
    journal = False
    if path:
        try:
            handler = SafeFileHandler(path)
        except OSError:
            handler = None
        fmt = "%(asctime)s fdbhook[%(process)d]: %(message)s"
    if handler is None and not path and journald_running():
        handler, fmt, journal = JournalHandler(), "%(message)s", True
    if handler is None and os.path.exists("/dev/log"):
        handler = _syslog_handler()
        fmt = "fdbhook[%(process)d]: %(message)s"
    if handler is None and not path:
        try:
            handler = SafeFileHandler(FALLBACK_LOG)
        except OSError:
            handler = None
        fmt = "%(asctime)s fdbhook[%(process)d]: %(message)s"
    if handler is not None:
        handler.setFormatter(SafeFormatter(fmt))
        root.addHandler(handler)
    if not hook and not (journal and _stderr_is_journal() and not verbose):
        console = logging.StreamHandler()
        console.setLevel(logging.DEBUG if verbose else logging.WARNING)
        console.setFormatter(SafeFormatter("fdbhook: %(message)s"))
        root.addHandler(console)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
