"""Journal lines: the per-NIC fields and MESSAGE_IDs, and no systemd import before a line is logged."""

import logging
import logging.handlers
import os
import subprocess
import sys

from fdbhook import domxml, logsetup
from fdbhook.engine import apply_domain, teardown_domain
from fdbhook.state import Store
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, config, domain_xml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Capture(logsetup.JournalHandler):
    """The real handler (python3-systemd's JournalHandler) with journal.send replaced by a list."""

    def __init__(self):
        super().__init__()
        self.sent = []
        self.sender = self.send

    def send(self, MESSAGE, MESSAGE_ID=None, CODE_FILE=None, CODE_LINE=None, CODE_FUNC=None, **kwargs):
        """systemd.journal.send's signature; it formats CODE_LINE with {:d}."""
        assert CODE_LINE is None or isinstance(CODE_LINE, int)
        fields = dict(kwargs, CODE_FILE=CODE_FILE, CODE_LINE=CODE_LINE, CODE_FUNC=CODE_FUNC)
        if MESSAGE_ID is not None:
            fields["MESSAGE_ID"] = MESSAGE_ID
        self.sent.append((MESSAGE, fields))


def _capturing(name="fdbhook.engine"):
    handler = Capture()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    return handler, lambda: (logger.removeHandler(handler), logger.setLevel(old))


def test_every_per_nic_line_carries_domain_nic_mac_port_bridge_action(tmp_path):
    kernel = FakeKernel.bridge_with_ports("br0", ("vnet0", "eth0"))
    store = Store(str(tmp_path))
    handler, done = _capturing()
    try:
        apply_domain(domxml.parse_domain(domain_xml([bridge_nic()], name="web1")), config(), kernel, store)
        teardown_domain("qemu", "web1", kernel, store)
    finally:
        done()
    lines = [(m, f) for m, f in handler.sent if "FDBHOOK_DOMAIN" in f]
    assert len(lines) == 2
    (applied, fa), (removed, fr) = lines
    # The human line is unchanged: the same text syslog and the file get.
    assert applied.startswith("qemu/web1: net0 (52:54:00:00:00:01) vnet0 on br0: ")
    assert {k: fa[k] for k in ("FDBHOOK_DOMAIN", "FDBHOOK_NIC", "FDBHOOK_MAC", "FDBHOOK_PORT", "FDBHOOK_BRIDGE",
                               "FDBHOOK_ACTION", "FDBHOOK_RESULT", "FDBHOOK_DRIVER")} == {
        "FDBHOOK_DOMAIN": "web1", "FDBHOOK_NIC": "net0", "FDBHOOK_MAC": "52:54:00:00:00:01",
        "FDBHOOK_PORT": "vnet0", "FDBHOOK_BRIDGE": "br0", "FDBHOOK_ACTION": "apply",
        "FDBHOOK_RESULT": "changed", "FDBHOOK_DRIVER": "qemu"}
    assert fa["MESSAGE_ID"] == logsetup.MESSAGE_IDS["changed"]
    assert fa["PRIORITY"] == "6" and fa["SYSLOG_IDENTIFIER"] == "fdbhook"
    assert fr["FDBHOOK_ACTION"] == "teardown" and fr["MESSAGE_ID"] == logsetup.MESSAGE_IDS["removed"]


def test_failed_nic_is_an_error_with_its_own_message_id(tmp_path):
    kernel = FakeKernel.bridge_with_ports("br0", ("vnet0", "eth0"))
    kernel.fail_on = "flush"
    handler, done = _capturing()
    try:
        apply_domain(domxml.parse_domain(domain_xml([bridge_nic()], name="web1")), config(), kernel,
                     Store(str(tmp_path)))
    finally:
        done()
    fields = [f for _, f in handler.sent if f.get("FDBHOOK_RESULT") == "failed"]
    assert fields and fields[0]["PRIORITY"] == "3"
    assert fields[0]["MESSAGE_ID"] == logsetup.MESSAGE_IDS["failed"]


def test_message_ids_are_distinct_128_bit_hex():
    ids = list(logsetup.MESSAGE_IDS.values()) + [logsetup.OTHER_MESSAGE_ID]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_lines_without_fields_carry_no_fdbhook_fields():
    handler = Capture()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(logging.LogRecord("fdbhook.daemon", logging.WARNING, __file__, 1, "resync: %d", (3,), None))
    [(message, fields)] = handler.sent
    assert message == "resync: 3" and fields["PRIORITY"] == "4" and fields["SYSLOG_IDENTIFIER"] == "fdbhook"
    assert not [k for k in fields if k.startswith("FDBHOOK_")] and "MESSAGE_ID" not in fields


def test_empty_values_are_left_out():
    extra = logsetup.nic_fields("qemu", "web1", None, "52:54:00:00:00:01", None, None, "apply", "skipped")
    assert "FDBHOOK_NIC" not in extra and "FDBHOOK_PORT" not in extra


def test_without_python3_systemd_the_journal_handler_falls_back_to_syslog(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_systemd(name, *args, **kwargs):
        if name == "systemd" or name.startswith("systemd."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_systemd)
    handler = logsetup.JournalHandler()
    handler.emit(logging.LogRecord("fdbhook", logging.INFO, __file__, 1, "hello", (), None))
    assert isinstance(handler._target, (logging.handlers.SysLogHandler, logging.NullHandler))


def _hook_modules(op, journal_socket):
    """Run the standalone hook in a fresh interpreter; which systemd modules did it load?"""
    code = ("import io, sys; import fdbhook.logsetup as l; l.JOURNAL_SOCKET = %r; "
            "l.JournalHandler.sender = None\n"
            "from fdbhook.client import main\n"
            "main('qemu', ['t1', %r, 'begin', '-'], io.BytesIO(b'<domain/>'))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'systemd'))") % (journal_socket, op)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"FDBHOOK_NO_DAEMON": "1", "FDBHOOK_CONF": "/nonexistent", "PATH": "/usr/bin:/bin",
                              "PYTHONPATH": ROOT})
    return out.stdout.strip().splitlines()[-1], out


def test_inert_hook_with_journald_imports_no_systemd(tmp_path):
    sock = tmp_path / "socket"
    sock.write_text("")  # journald "runs"
    modules, out = _hook_modules("prepare", str(sock))
    assert modules == "[]", out
