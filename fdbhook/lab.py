"""A throwaway network lab: one network namespace with bridges, taps and veths.

Used by ``fdbhook demo`` and by the root test tier. Everything lives inside a
uniquely named network namespace, so deleting the namespace removes every
device, FDB entry and sysctl the lab touched; nothing is created in the
caller's namespace.

Deliberately independent of fdbhook's own netlink code: it drives the kernel
with the ``ip``/``bridge`` binaries (iproute2) and reads results back from
their JSON output, so tests that check fdbhook against this lab compare two
separate implementations. It must not import pyroute2 (one module owns that).

Traffic is raw Ethernet frames with the local experimental ethertype 0x88B5
and a per-test marker at the start of the payload, never IP.
"""

import contextlib
import ctypes
import fcntl
import itertools
import json
import logging
import os
import select
import socket
import struct
import subprocess
import threading
import time

LOG = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
ETH_P_EXPERIMENTAL = 0x88B5  # IEEE 802 "local experimental ethertype 1"
ETH_ZLEN = 60  # minimum frame length without FCS; shorter frames get padded

# linux/sched.h
CLONE_NEWNET = 0x40000000
# linux/if_tun.h: _IOW('T', 202, int)
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no 4-byte packet-info header: fd reads/writes bare frames
# linux/if_packet.h: pkttype of a frame this host sent on the device
PACKET_OUTGOING = 4

IFNAMSIZ = 16
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int

_ns_counter = itertools.count(1)
_ns_counter_lock = threading.Lock()


class LabError(RuntimeError):
    """An ``ip``/``bridge`` command or a lab set-up step failed."""


# --------------------------------------------------------------------------
# Frames


def mac_bytes(mac):
    """Return the 6 raw bytes of MAC, given as 'aa:bb:cc:dd:ee:ff' or bytes."""
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError("MAC must be 6 bytes, got %d" % len(mac))
        return bytes(mac)
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError("not a MAC address: %r" % (mac,))
    return bytes(int(p, 16) for p in parts)


def mac_str(raw):
    """Return the lower-case colon form of 6 raw MAC bytes."""
    return ":".join("%02x" % b for b in raw)


def make_frame(dst, src, payload=b"", ethertype=ETH_P_EXPERIMENTAL):
    """Return an Ethernet II frame, zero-padded to the 60-byte minimum.

    DST and SRC are MAC strings or 6-byte values. No FCS (the kernel adds
    none on taps and veths either).
    """
    frame = mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype)
    frame += bytes(payload)
    if len(frame) < ETH_ZLEN:
        frame += b"\0" * (ETH_ZLEN - len(frame))
    return frame


def parse_frame(frame):
    """Return (dst, src, ethertype, payload) of an Ethernet II frame.

    MACs come back as lower-case strings; the payload keeps any padding.
    Raises ValueError on frames shorter than an Ethernet header.
    """
    if len(frame) < 14:
        raise ValueError("frame too short: %d bytes" % len(frame))
    (ethertype,) = struct.unpack("!H", frame[12:14])
    return mac_str(frame[0:6]), mac_str(frame[6:12]), ethertype, bytes(frame[14:])


def count_marked(frames, marker):
    """Count frames with ethertype 0x88B5 whose payload starts with MARKER.

    Tests put a unique marker in every frame they send so that anything the
    kernel emits on its own (ND, MLD, STP) is never counted.
    """
    marker = bytes(marker)
    count = 0
    for frame in frames:
        try:
            _, _, ethertype, payload = parse_frame(frame)
        except ValueError:
            continue
        if ethertype == ETH_P_EXPERIMENTAL and payload.startswith(marker):
            count += 1
    return count


# --------------------------------------------------------------------------
# Helpers


def poll(predicate, timeout=5.0, interval=0.02):
    """Return True as soon as PREDICATE() is truthy, False after TIMEOUT s.

    The predicate is tried once more at the deadline, so a condition that
    turns true during the last sleep is not reported as a timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def _run(argv, check=True):
    """Run ARGV; return stdout. On failure raise LabError naming argv+stderr."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError("%s: %s" % (" ".join(argv), exc)) from exc
    if check and proc.returncode != 0:
        raise LabError(
            "%s: exit %d: %s"
            % (" ".join(argv), proc.returncode, proc.stderr.strip() or "(no stderr)")
        )
    return proc.stdout


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "setns: %s" % os.strerror(err))


@contextlib.contextmanager
def in_netns(ns):
    """Run the body with the calling THREAD in network namespace NS.

    NS is a name under /run/netns or a path. setns() switches only this
    thread, so other threads keep working in their own namespace. Sockets and
    tun fds opened in the body belong to NS for their whole life. The thread
    is always switched back to where it was, even if the body raised.
    """
    target = ns if "/" in ns else os.path.join(NETNS_RUN_DIR, ns)
    # thread-self, not self: /proc/self/ns/net is the main thread's namespace,
    # which differs from ours if some other code already moved this thread.
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target_fd)
        finally:
            os.close(target_fd)
        try:
            yield
        finally:
            # If this fails the thread is stranded in the lab namespace and
            # everything it does later would go to the wrong place: let it raise.
            _setns(original)
    finally:
        os.close(original)


# --------------------------------------------------------------------------
# Endpoints


class Endpoint:
    """The far end of a lab port: a tap fd (the "guest") or a packet socket.

    ``send`` injects a frame as if the guest/outside world sent it;
    ``recv_frames`` returns frames the bridge delivered to this end.
    """

    def __init__(self, name, ns, fd=None, sock=None):
        self.name = name
        self.ns = ns
        self._fd = fd  # tap: reads and writes are whole frames
        self._sock = sock  # veth peer: AF_PACKET socket bound to it

    def __repr__(self):
        return "Endpoint(%r in %r)" % (self.name, self.ns)

    @property
    def closed(self):
        return self._fd is None and self._sock is None

    @property
    def mac(self):
        """The device's MAC as the kernel reports it now (lower case)."""
        out = _run(["ip", "-n", self.ns, "-j", "link", "show", "dev", self.name])
        return json.loads(out)[0]["address"]

    def fileno(self):
        if self._sock is not None:
            return self._sock.fileno()
        if self._fd is not None:
            return self._fd
        raise LabError("endpoint %s is closed" % self.name)

    def send(self, frame):
        """Inject FRAME into the device's ingress (what the bridge receives)."""
        frame = bytes(frame)
        if self._sock is not None:
            sent = self._sock.send(frame)
        else:
            sent = os.write(self.fileno(), frame)
        if sent != len(frame):
            raise LabError("%s: short write %d/%d" % (self.name, sent, len(frame)))

    def _read_one(self):
        """Return one pending incoming frame, b"" for a skipped one, None if none."""
        try:
            if self._sock is not None:
                data, addr = self._sock.recvfrom(65535)
                # A packet socket also sees what we sent through it; those
                # frames never came from the bridge.
                if addr[2] == PACKET_OUTGOING:
                    return b""
                return data
            return os.read(self.fileno(), 65535)
        except BlockingIOError:
            return None

    def drain(self):
        """Discard every frame already queued; return how many were dropped."""
        dropped = 0
        while True:
            data = self._read_one()
            if data is None:
                return dropped
            if data:
                dropped += 1

    def recv_frames(self, timeout=0.3, max_wait=10.0):
        """Return the frames received until none arrived for TIMEOUT seconds.

        Only frames that came IN to this end are returned (not our own sends).
        MAX_WAIT caps the total time so a chatty link cannot block forever.
        """
        frames = []
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        hard_deadline = time.monotonic() + max_wait
        quiet_deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            remaining = min(quiet_deadline, hard_deadline) - now
            if remaining <= 0:
                return frames
            if not poller.poll(remaining * 1000.0):
                continue
            while True:
                data = self._read_one()
                if data is None:
                    break
                if data:
                    frames.append(data)
                    quiet_deadline = time.monotonic() + timeout

    def close(self):
        """Release the fd. Closing a tap's fd deletes the tap (like QEMU exiting)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------
# The lab


class Lab:
    """A private network namespace for bridge experiments.

    Use as a context manager: on exit every fd the lab opened is closed and
    the namespace is deleted (with all devices in it), also when the body
    raised. ``lab.ns`` is the namespace name.
    """

    def __init__(self, prefix="fdbh"):
        self.prefix = prefix
        self.ns = None
        self._endpoints = []

    # -- lifecycle ---------------------------------------------------------

    def open(self):
        """Create the namespace with lo up and IPv6 off; return self."""
        if self.ns is not None:
            raise LabError("lab %s is already open" % self.ns)
        for _ in range(100):
            with _ns_counter_lock:
                n = next(_ns_counter)
            name = "%s-%d-%d" % (self.prefix, os.getpid(), n)
            # A namespace with our name can only be a leftover of an earlier
            # process that had our pid; skip it rather than reuse it.
            if os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
                continue
            _run(["ip", "netns", "add", name])
            self.ns = name
            break
        else:
            raise LabError("no free namespace name for prefix %s" % self.prefix)
        try:
            # IPv6 off before any device exists ("default" is what new devices
            # inherit): otherwise the kernel sends ND/MLD frames of its own.
            with in_netns(self.ns):
                for conf in ("default", "all"):
                    path = "/proc/sys/net/ipv6/conf/%s/disable_ipv6" % conf
                    if os.path.exists(path):
                        with open(path, "w") as fh:
                            fh.write("1")
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """Close all endpoint fds, then delete the namespace. Idempotent."""
        errors = []
        for endpoint in self._endpoints:
            try:
                endpoint.close()
            except OSError as exc:
                errors.append("%s: %s" % (endpoint.name, exc))
        self._endpoints = []
        if self.ns is not None:
            ns, self.ns = self.ns, None
            # Our fds pinned the namespace; with them closed, deleting the
            # name drops the last reference and the kernel destroys it.
            try:
                _run(["ip", "netns", "delete", ns])
            except LabError as exc:
                errors.append(str(exc))
        if errors:
            raise LabError("lab cleanup: " + "; ".join(errors))

    def __enter__(self):
        return self.open()

    def __exit__(self, exc_type, exc, tb):
        try:
            self.close()
        except LabError:
            if exc_type is None:
                raise
            # Don't hide the body's exception behind a cleanup failure.
            LOG.warning("lab cleanup failed", exc_info=True)
        return False

    # -- commands ----------------------------------------------------------

    def _need_ns(self):
        if self.ns is None:
            raise LabError("lab is not open")
        return self.ns

    def ip(self, *args):
        """Run ``ip -n NS ARGS``; return stdout, raise LabError on failure."""
        return _run(["ip", "-n", self._need_ns(), *map(str, args)])

    def bridge(self, *args):
        """Run ``bridge -n NS ARGS``; return stdout, raise LabError on failure."""
        return _run(["bridge", "-n", self._need_ns(), *map(str, args)])

    def json(self, *args, tool="ip"):
        """Run ``ip -n NS -j ARGS`` (or bridge) and return the parsed JSON.

        Empty output (some show commands print nothing) parses as [].
        """
        out = _run([tool, "-n", self._need_ns(), "-j", *map(str, args)])
        return json.loads(out) if out.strip() else []

    def exec_argv(self, argv):
        """Return an argv that runs ARGV inside the namespace."""
        return ["ip", "netns", "exec", self._need_ns(), *argv]

    # -- building ----------------------------------------------------------

    def add_bridge(self, name, ageing=None):
        """Create bridge NAME (up). AGEING is the FDB ageing time in seconds.

        STP stays off (the default), so ports forward as soon as they have
        carrier.
        """
        args = ["link", "add", name, "type", "bridge"]
        if ageing is not None:
            # IFLA_BR_AGEING_TIME is in clock_t (1/100 s); iproute2 passes the
            # number through unchanged.
            args += ["ageing_time", str(int(round(ageing * 100)))]
        self.ip(*args)
        self.ip("link", "set", name, "up")

    def _set_mac(self, dev, mac):
        if mac is not None:
            self.ip("link", "set", "dev", dev, "address", mac)

    def _attach(self, dev, bridge):
        if bridge is not None:
            self.ip("link", "set", "dev", dev, "master", bridge)

    def _wait_forwarding(self, dev):
        # Without STP a port forwards as soon as it has carrier, but that
        # happens asynchronously to the "ip link set up" that caused it.
        if not poll(lambda: self.port_flags(dev).get("state") == "forwarding"):
            raise LabError(
                "%s: bridge port not forwarding: %s" % (dev, self.port_flags(dev))
            )

    def add_tap(self, name, bridge=None, mac=None):
        """Create a real tap NAME (held open, up, on BRIDGE); return its Endpoint.

        Opened through /dev/net/tun like QEMU does, so the device has carrier
        while the lab holds the fd and disappears when the fd is closed.
        The Endpoint plays the guest: ``send`` enters the bridge through the
        tap, ``recv_frames`` sees what the bridge forwards to the tap.
        """
        if len(name.encode()) >= IFNAMSIZ:
            raise LabError("interface name too long: %s" % name)
        self._need_ns()
        with in_netns(self.ns):
            # The tun fd's device is created in the opening thread's netns.
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        endpoint = Endpoint(name, self.ns, fd=fd)
        self._endpoints.append(endpoint)
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            raise LabError("TUNSETIFF %s: %s" % (name, exc)) from exc
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self._set_mac(name, mac)
        self._attach(name, bridge)
        self.ip("link", "set", name, "up")
        if bridge is not None:
            self._wait_forwarding(name)
        return endpoint

    def add_veth_pair_raw(self, a, b):
        """Create veth pair A<->B inside the namespace, both up, no endpoint."""
        self.ip("link", "add", a, "type", "veth", "peer", "name", b)
        self.ip("link", "set", a, "up")
        self.ip("link", "set", b, "up")

    def add_veth(self, name, peer, bridge=None, mac=None):
        """Create veth NAME (on BRIDGE) <-> PEER; return an Endpoint for PEER.

        For an uplink ("outside world") or an LXC-style guest. MAC, if given,
        goes on PEER, the side that plays the guest/outside world. The
        Endpoint is an AF_PACKET socket bound to PEER that receives every
        frame arriving there, whatever its destination MAC.
        """
        self.ip("link", "add", name, "type", "veth", "peer", "name", peer)
        self._set_mac(peer, mac)
        self._attach(name, bridge)
        self.ip("link", "set", peer, "up")
        self.ip("link", "set", name, "up")
        with in_netns(self.ns):
            # Packet sockets belong to the netns they were created in.
            # Protocol 0 until bound: with ETH_P_ALL the socket would queue
            # frames from every device in the namespace in the meantime.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        endpoint = Endpoint(peer, self.ns, sock=sock)
        self._endpoints.append(endpoint)
        sock.setblocking(False)
        # Python resolves the name with an ioctl on this socket, i.e. in the
        # lab namespace, so a same-named host device can never be picked.
        sock.bind((peer, ETH_P_ALL))
        if bridge is not None:
            self._wait_forwarding(name)
        return endpoint

    def add_bond_uplink(self, bond, slave, peer, bridge, mac=None):
        """An active-backup bond BOND on BRIDGE whose one slave is veth SLAVE<->PEER.

        A bond filters unicast (IFF_UNICAST_FLT), so on a VLAN-filtering
        bridge the kernel can take it out of promiscuous mode; veths and taps
        never can. Needs the bonding module (full distribution kernels).
        Returns the Endpoint of PEER: the outside world behind the uplink.
        """
        self.ip("link", "add", bond, "type", "bond", "mode", "active-backup")
        endpoint = self.add_veth(slave, peer, mac=mac)
        self.ip("link", "set", slave, "down")  # a bond only enslaves devices that are down
        self.ip("link", "set", slave, "master", bond)
        self.ip("link", "set", slave, "up")
        self.ip("link", "set", bond, "master", bridge)
        self.ip("link", "set", bond, "up")
        return endpoint

    # -- independent readers ----------------------------------------------

    def link(self, dev):
        """Return ``ip -d -j link show dev DEV`` for one device (a dict)."""
        return self.json("-d", "link", "show", "dev", dev)[0]

    def port_flags(self, dev):
        """Return DEV's bridge-port settings as iproute2 reports them.

        The dict holds every key of linkinfo.info_slave_data (iproute2 6.1:
        learning, flood, mcast_flood, bcast_flood, neigh_suppress, isolated,
        locked, hairpin, proxy_arp, state, ...), plus ``master``. The flag
        keys listed in PORT_FLAG_KEYS are always present; None means DEV is
        not a bridge port or iproute2 did not report the flag. FDB "sticky"
        is a per-entry flag (see ``fdb``), not a port flag.
        """
        link = self.link(dev)
        info = link.get("linkinfo", {})
        flags = {key: None for key in PORT_FLAG_KEYS}
        if info.get("info_slave_kind") == "bridge":
            flags.update(info.get("info_slave_data", {}))
        flags["master"] = link.get("master")
        return flags

    def fdb(self, dev=None, br=None):
        """Return the FDB as ``bridge -j fdb show [br BR] [dev DEV]`` lists it.

        Each entry is a dict with at least mac, ifname, flags (a list, e.g.
        ["sticky"], ["self"], ["extern_learn"]), state and master. iproute2
        spells the NUD state as: "static" = NUD_NOARP (the entry fdbhook
        wants), "permanent" = NUD_PERMANENT (a LOCAL entry: frames go to the
        host), and omits it for dynamic (learned) entries; those get state
        "" here. ``dev`` filtering makes iproute2 drop ifname; it is put back.
        """
        args = ["fdb", "show"]
        if br is not None:
            args += ["br", br]
        if dev is not None:
            args += ["dev", dev]
        entries = self.json(*args, tool="bridge")
        for entry in entries:
            entry.setdefault("ifname", dev)
            entry.setdefault("flags", [])
            entry.setdefault("state", "")
            entry.setdefault("master", None)
        return entries

    def promiscuity(self, dev):
        """Return DEV's promiscuity counter (0 = not promiscuous)."""
        return int(self.link(dev).get("promiscuity", 0))


# Port flags that ``Lab.port_flags`` always returns (None if not reported).
PORT_FLAG_KEYS = (
    "state",
    "learning",
    "flood",
    "mcast_flood",
    "bcast_flood",
    "neigh_suppress",
    "isolated",
    "locked",
)
