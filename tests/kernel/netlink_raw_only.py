"""Run fdbhook with only raw netlink sockets allowed, as under libvirtd's AppArmor profile.

Debian/Ubuntu's profile grants ``network netlink raw`` and nothing else for
netlink; a SOCK_DGRAM netlink socket gets EACCES. This wrapper refuses such
sockets the same way (an audit hook on socket creation), then runs
``fdbhook.cli.main`` or, with ``--hook DRIVER``, the installed hook's entry.
"""

import socket
import sys


def refuse_dgram_netlink(event, args):
    if event == "socket.__new__":
        _, family, type_, _ = args
        if family == socket.AF_NETLINK and type_ & 0xF != socket.SOCK_RAW:
            raise PermissionError(13, "netlink socket type %d denied (only raw allowed)" % type_)


sys.addaudithook(refuse_dgram_netlink)

if __name__ == "__main__":
    if sys.argv[1] == "--hook":
        from fdbhook.client import main as hook
        sys.exit(hook(sys.argv[2], sys.argv[3:]))
    from fdbhook.cli import main
    sys.exit(main(sys.argv[1:]))
