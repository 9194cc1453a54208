"""Incoming migration: the guest's first frame on its new port, not libvirt's RESUMED, puts the entries in.

On the destination of a live migration fdbhookd keeps the guest's ports
locked down with no entry (fdbhook.hook, the ``migrate`` mark). The guest is
paused until the source has handed over its whole state; the first frame it
sends from one of its NIC's known MACs is QEMU's announce, sent once the
destination holds that state and the source is paused - 3 to 35 ms before
libvirt's RESUMED reaches fdbhookd here. This module decides, from the
records and incoming marks alone (no kernel, no sockets):

* which ports to watch, for which source MACs (``wanted``): every port of a
  paused record whose domain is marked incoming; the MACs are those the
  hook/live XML gave the NIC (its MAC, extra MACs, the configured MAC when the
  guest uses another) - never one read from a frame;
* what a frame on a watched port means (``FirstFrames.fired``): the domain
  whose entries go in now, once per domain;
* when to stop watching (``FirstFrames.update``): the port left the wanted
  set (RESUMED, stop, release, detach, an aborted migration) or it has been
  watched longer than WATCH_FOR.

The socket itself (an AF_PACKET socket on the port with ``bpf_program`` as
its filter) is fdbhook.kernel's FrameSocket; the daemon's "frames" thread
polls them all.
"""

from dataclasses import dataclass
from typing import Tuple

WATCH_FOR = 900.0  # s: a port watched this long is dropped (RESUMED still puts the entries in)

# classic BPF (linux/filter.h)
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_JEQ_K = 0x15
_RET_K = 0x06
_SKF_AD_PKTTYPE = -0x1000 + 4  # SKF_AD_OFF + SKF_AD_PKTTYPE
PACKET_OUTGOING = 4  # linux/if_packet.h: a frame the port sends (to the guest), not one it receives
ACCEPT = 96  # bytes of a matching frame copied to the socket (only its arrival counts)


@dataclass(frozen=True)
class Watch:
    """Watch port ``ifindex`` (``port``) of ``driver``/``name`` for a frame from one of ``macs``."""

    ifindex: int
    port: str
    driver: str
    name: str
    macs: Tuple[str, ...]


def nic_macs(rec):
    """The MACs a NIC record knows for its guest: the ones with entries, then the configured one."""
    macs = list(rec.macs)
    if rec.config_mac and rec.config_mac not in macs:
        macs.append(rec.config_mac)
    return tuple(macs)


def wanted(records, incoming):
    """{ifindex: Watch} for every port of a paused record whose (driver, name) is in ``incoming``."""
    out = {}
    for record in records:
        if not record.paused or (record.driver, record.domain) not in incoming:
            continue
        for rec in record.nics:
            out[rec.ifindex] = Watch(rec.ifindex, rec.port, record.driver, record.domain, nic_macs(rec))
    return out


def bpf_program(macs):
    """Classic BPF accepting a frame the port receives (not one it sends) whose source MAC is in ``macs``.

    A list of (code, jt, jf, k). Received on a tap or a veth's host end means
    sent by the guest; a frame the bridge forwards to the guest (a broadcast
    of the still-running source guest, say) is PACKET_OUTGOING there and is
    dropped, whatever its source MAC.
    """
    macs = [bytes.fromhex(mac.replace(":", "")) for mac in macs]
    if not macs or len(macs) > 50:
        raise ValueError("1 to 50 MACs to watch, not %d" % len(macs))
    reject = 3 + 4 * len(macs)  # index of the final "drop"
    prog = [(_LD_W_ABS, 0, 0, _SKF_AD_PKTTYPE & 0xFFFFFFFF),
            (_JEQ_K, reject - 2, 0, PACKET_OUTGOING)]
    for i, mac in enumerate(macs):
        here = 2 + 4 * i
        accept = reject - 1
        nxt = here + 4 if i < len(macs) - 1 else reject  # the next MAC's first instruction, or the drop
        prog += [(_LD_W_ABS, 0, 0, 6),  # source MAC, bytes 6-9
                 (_JEQ_K, 0, nxt - (here + 1) - 1, int.from_bytes(mac[:4], "big")),
                 (_LD_H_ABS, 0, 0, 10),  # bytes 10-11
                 (_JEQ_K, accept - (here + 3) - 1, nxt - (here + 3) - 1, int.from_bytes(mac[4:], "big"))]
    prog += [(_RET_K, 0, 0, ACCEPT), (_RET_K, 0, 0, 0)]
    return prog


class FirstFrames:
    """Which ports are watched, and what a frame on one means. Pure: times are passed in."""

    def __init__(self, watch_for=WATCH_FOR):
        self.watch_for = watch_for
        self.watching = {}  # ifindex -> (Watch, since)
        self.done = set()  # (driver, name) that fired while still wanted
        self.given_up = set()  # ifindexes still wanted but no longer watched (too long, socket failed)

    def update(self, want, now):
        """Bring the watched set to ``want`` ({ifindex: Watch}): returns (to open, to close) lists of Watch.

        A port that changed (new MACs, another domain) is closed and opened again;
        a port watched for longer than ``watch_for`` is closed and not opened
        again while it stays wanted.
        """
        to_open, to_close = [], []
        for ifindex, (watch, since) in list(self.watching.items()):
            expired = now - since > self.watch_for
            if want.get(ifindex) != watch or expired:
                to_close.append(watch)
                del self.watching[ifindex]
                if expired and want.get(ifindex) == watch:
                    self.given_up.add(ifindex)
        self.done &= {(w.driver, w.name) for w in want.values()}
        self.given_up &= set(want)
        for ifindex, watch in sorted(want.items()):
            if ifindex not in self.watching and ifindex not in self.given_up \
                    and (watch.driver, watch.name) not in self.done:
                self.watching[ifindex] = (watch, now)
                to_open.append(watch)
        return to_open, to_close

    def fired(self, ifindex):
        """A matching frame arrived on ``ifindex``: (the Watch, every Watch of its domain to close).

        The Watch is None when that domain already fired (or the port is not
        watched); the domain's ports are no longer watched either way.
        """
        item = self.watching.get(ifindex)
        if item is None:
            return None, []
        watch = item[0]
        key = (watch.driver, watch.name)
        closing = [w for w, _ in self.watching.values() if (w.driver, w.name) == key]
        for w in closing:
            del self.watching[w.ifindex]
        first = key not in self.done
        self.done.add(key)
        return (watch if first else None), closing

    def dropped(self, ifindex):
        """The port's socket failed (the port vanished): stop watching it. Returns its Watch or None."""
        item = self.watching.pop(ifindex, None)
        if item is None:
            return None
        self.given_up.add(ifindex)
        return item[0]
