"""The hook's fast path: hand the invocation to fdbhookd, or do it ourselves.

Imports nothing beyond what the interpreter has already loaded at start-up
(``_socket`` instead of ``socket``, no ``json``: each costs milliseconds of
import on a path whose budget is the interpreter's own start). If the
daemon's socket is absent, refuses, or does not answer in time, the hook
runs the engine itself with the same semantics (fdbhook.hook.answer).

Wire format (both directions), every field length-prefixed (4 bytes, big
endian): request  b"FDB1" driver argv("\\0"-joined) stdin
          answer   b"FDB1" code(as text) stdout stderr
"""

import os
import sys

import _socket

from fdbhook import MAX_INPUT_BYTES

DEFAULT_SOCKET = "/run/fdbhook/fdbhookd.sock"
MAGIC = b"FDB1"
MAX_STDIN = MAX_INPUT_BYTES + 1  # one byte over the limit: the parser then refuses it
# 200 hooks at once must be served, not shed (fdbhookd listens with a backlog
# of 1024): a connect waits up to 1 s for a free slot.
CONNECT_TIMEOUT = 1.0
ANSWER_TIMEOUT = 5.0
# Why the last offer() got no answer: "absent" (no socket, nobody listening)
# or "busy" (fdbhookd runs but did not accept or answer in time).
last_failure = None


def socket_path():
    return os.environ.get("FDBHOOK_SOCKET") or DEFAULT_SOCKET


def pack(*fields):
    return MAGIC + b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def unpack(data, count):
    """Split a framed message into ``count`` fields; ValueError if malformed."""
    if data[:4] != MAGIC:
        raise ValueError("bad magic")
    fields, pos = [], 4
    for _ in range(count):
        size = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if pos + size > len(data):
            raise ValueError("truncated")
        fields.append(data[pos:pos + size])
        pos += size
    return fields


def encode_request(driver, argv, data):
    return pack(driver.encode(), "\0".join(argv).encode("utf-8", "surrogateescape"), data)


def offer(driver, argv, data, path=None, timeout=ANSWER_TIMEOUT):
    """Ask the daemon to serve this hook. (code, stdout, stderr), or None (``last_failure`` says why)."""
    global last_failure
    path = path or socket_path()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    last_failure = "busy"
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            if exc.errno in (2, 20, 111):  # ENOENT, ENOTDIR, ECONNREFUSED (Linux; no errno import here)
                last_failure = "absent"
            raise
        sock.settimeout(timeout)
        sock.sendall(encode_request(driver, argv, data))
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        code, out, err = unpack(b"".join(chunks), 3)
        return int(code), out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def read_stdin(stream):
    """The hook's stdin, read once: at most MAX_STDIN bytes, the rest drained.

    Draining means libvirtd never writes into a closed pipe (EPIPE); the
    parser refuses anything over its limit, so one byte more is enough.
    """
    data = stream.read(MAX_STDIN)
    while stream.read(65536):
        pass
    return data


def main(driver, argv=None, stdin=None):
    """Entry point of the installed hooks: daemon first, standalone fallback."""
    argv = sys.argv[1:] if argv is None else argv
    data = read_stdin(stdin if stdin is not None else sys.stdin.buffer)
    answer = None
    if os.environ.get("FDBHOOK_NO_DAEMON") != "1":
        answer = offer(driver, argv, data)
    if answer is None:
        if sys.flags.no_site:
            # Started with -S (the installed hooks): the engine needs the
            # virtualenv's and the system's site packages (lxml, pyroute2).
            import site
            site.main()

        from fdbhook.hook import answer as serve_here
        # fdbhookd runs but is busy: its semantics (an incoming migration's
        # entries wait for RESUMED, which fdbhookd sees); absent: ours.
        return serve_here(driver, argv, data, daemon=last_failure == "busy")
    code, out, err = answer
    if out:
        sys.stdout.write(out)
    if err:
        sys.stderr.write(err + "\n")
    return code
