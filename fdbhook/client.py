"""The hook's fast path: hand the invocation to fdbhookd, or do it ourselves.

Standard library only: a hook that the daemon serves never pays for lxml or
pyroute2. If the daemon's socket is absent, refuses, or does not answer in
time, the hook runs the engine itself with the same semantics (cli.hook_main).
"""

import json
import os
import socket
import sys

DEFAULT_SOCKET = "/run/fdbhook/fdbhookd.sock"
MAX_STDIN = 8 * 1024 * 1024 + 1  # domxml.MAX_XML_BYTES + 1: the parser refuses more
CONNECT_TIMEOUT = 0.2
ANSWER_TIMEOUT = 5.0


def socket_path():
    return os.environ.get("FDBHOOK_SOCKET") or DEFAULT_SOCKET


def offer(driver, argv, data, path=None, timeout=ANSWER_TIMEOUT):
    """Ask the daemon to serve this hook. (code, stdout, stderr), or None."""
    path = path or socket_path()
    if not os.path.exists(path):
        return None
    request = json.dumps({"v": 1, "driver": driver, "argv": list(argv),
                          "stdin": data.decode("utf-8", "surrogateescape")},
                         ensure_ascii=True).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(path)
        sock.settimeout(timeout)
        sock.sendall(request)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                break
        answer = json.loads(b"".join(chunks))
        return int(answer["code"]), answer.get("stdout", ""), answer.get("stderr", "")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        sock.close()


def main(driver, argv=None, stdin=None):
    """Entry point of the installed hooks: daemon first, standalone fallback."""
    argv = sys.argv[1:] if argv is None else argv
    stream = stdin if stdin is not None else sys.stdin.buffer
    data = stream.read(MAX_STDIN)
    while stream.read(65536):  # never leave libvirtd writing into a closed pipe
        pass
    answer = None
    if os.environ.get("FDBHOOK_NO_DAEMON") != "1":
        answer = offer(driver, argv, data)
    if answer is None:
        import io

        from fdbhook.cli import hook_main
        return hook_main(driver, argv, stdin=io.BytesIO(data))
    code, out, err = answer
    if out:
        sys.stdout.write(out)
    if err:
        sys.stderr.write(err + "\n")
    return code
