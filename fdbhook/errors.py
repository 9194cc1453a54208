"""fdbhook's exceptions: one base with a message template, one class per cause.

Each class also inherits the builtin that best describes it, so callers that
do not know fdbhook can still catch ``ValueError`` or ``OSError``. The CLI maps
``exit_code`` to the process exit status.
"""


class FdbhookError(Exception):
    """Base error. ``msg_fmt`` is filled from the keyword arguments."""

    msg_fmt = "fdbhook error: %(reason)s"
    exit_code = 1

    def __init__(self, message=None, **kwargs):
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError):
                message = "%s %r" % (self.msg_fmt, kwargs)
        self.message = message
        super().__init__(message)

    def __str__(self):
        return self.message


def log_failure(log, exc, fmt, *args):
    """Log a caught failure: an FdbhookError (expected: a state directory, the kernel, bad input) in one
    line with its message, anything else (a bug) with its traceback."""
    if isinstance(exc, FdbhookError):
        log.error(fmt + ": %s", *(args + (exc,)))
    else:
        log.error(fmt, *args, exc_info=exc)


class UsageError(FdbhookError, ValueError):
    msg_fmt = "%(reason)s"
    exit_code = 2


class ConfigError(FdbhookError, ValueError):
    msg_fmt = "config %(path)s: %(reason)s"
    exit_code = 2


class InvalidDomainXML(FdbhookError, ValueError):
    msg_fmt = "domain %(domain)s: invalid XML: %(reason)s"
    exit_code = 2


class KernelError(FdbhookError, OSError):
    """A netlink request failed."""

    msg_fmt = "%(what)s: %(reason)s"


class ApplyError(FdbhookError, RuntimeError):
    msg_fmt = "domain %(domain)s: NIC %(nic)s: %(reason)s"


class StateError(FdbhookError, OSError):
    msg_fmt = "state %(path)s: %(reason)s"


class LibvirtError(FdbhookError, RuntimeError):
    msg_fmt = "libvirt: %(reason)s"
    exit_code = 3
