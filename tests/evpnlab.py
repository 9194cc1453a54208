"""An EVPN fabric on one machine: hosts joined by VXLAN whose MACs are carried by BGP EVPN (FRR).

Each host is a network namespace (``fxe-PID-N``, fdbhook.lab.Lab) with

* bridge ``br0`` and VXLAN port ``vxlan100`` (VNI 100, UDP 4789, ``nolearning``
  on the device, learning off on the port), its VTEP address 198.18.0.N/24 on
  the underlay veth ``wire``;
* FRR's zebra and bgpd, started with ``-N NS`` (pathspace: their pid files,
  vty and zserv sockets under /var/run/frr/NS, nothing shared with a system
  FRR) and config files of this lab's own; iBGP (AS 65000), full mesh, l2vpn
  evpn with ``advertise-all-vni``;
* fdbhook's hook run as a subprocess inside the namespace (``FDBHOOK_*``
  paths in the host's directory, no daemon), and on demand an "agent": a
  long-lived process in the namespace that runs exactly fdbhookd's
  SUSPENDED / RESUMED job (``Daemon.run_job(kernel, Pause(...))``) when told,
  so that a simulated live migration (pause on A, resume on B) has the few
  milliseconds between the two that a real one has.

The hosts' ``wire`` veths meet in a fabric namespace on the learning bridge
``sw`` (the physical switch). A packet socket on each switch port sees every
underlay packet its host sends: ``Fabric.collect`` decodes VXLAN (UDP 4789)
down to the inner Ethernet frame, so a test counts how many copies of a frame
crossed the wire and to which VTEP. IP only inside these namespaces, only
198.18.0.0/24.

Everything is torn down on exit (also when the body raised): FRR daemons by
the pids they wrote, agents, namespaces, /var/run/frr/NS. The hosts' logs are
copied to /tmp/fxe-evpnlab-last first.
"""

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from fdbhook.lab import ETH_P_ALL, PACKET_OUTGOING, Lab, LabError, in_netns, parse_frame, poll

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRR_BIN = "/usr/lib/frr"
FRR_RUN = "/var/run/frr"
VTYSH = "/usr/bin/vtysh"
BRIDGE = "br0"
VXLAN = "vxlan100"
VNI = 100
WIRE = "wire"
ASN = 65000
LAST_LOGS = "/tmp/fxe-evpnlab-last"
# What hooks/qemu runs, minus -IS (the tests pass the checkout on PYTHONPATH).
HOOK_ENTRY = "import sys; from fdbhook.client import main; sys.exit(main(sys.argv.pop(1)))"
VXLAN_PORT = 4789
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF beyond rmem_max (root)


def frr_installed():
    return all(os.access(p, os.X_OK) for p in (os.path.join(FRR_BIN, "zebra"), os.path.join(FRR_BIN, "bgpd"), VTYSH))


def vtep(index):
    return "198.18.0.%d" % (index + 1)


class Host:
    """One EVPN host: a namespace with br0 + vxlan100, FRR, fdbhook's paths."""

    def __init__(self, index, name, base, sticky=None, dad=None):
        self.index = index
        self.name = name
        self.vtep = vtep(index)
        self.dir = os.path.join(base, name)  # FRR's (chowned to frr)
        self.fdir = os.path.join(base, name + "-fdbhook")  # fdbhook's: root's own (safefile refuses frr's)
        self.sticky = sticky
        self.dad = dad
        self.lab = Lab(prefix="fxe")
        self.pids = {}
        self.agent = None
        self.ns = None

    # --- set-up -----------------------------------------------------------------------
    def open(self):
        self.lab.open()
        self.ns = self.lab.ns
        os.makedirs(self.dir)
        os.makedirs(self.fdir, mode=0o700)
        self.write_config(self.config_text(self.sticky))
        return self

    @staticmethod
    def config_text(sticky=None):
        # No metrics textfile: fdbhookd's default path is the machine's node_exporter directory.
        text = "[manage]\nbridges = %s\n" % BRIDGE
        if sticky is not None:
            text += "sticky = %s\n" % sticky
        return text + "[metrics]\ntextfile =\n"

    def write_config(self, text):
        with open(os.path.join(self.fdir, "fdbhook.conf"), "w") as fh:
            fh.write(text)

    @property
    def env(self):
        return dict(os.environ, FDBHOOK_CONF=os.path.join(self.fdir, "fdbhook.conf"),
                    FDBHOOK_STATE_DIR=os.path.join(self.fdir, "state"), FDBHOOK_LOG=os.path.join(self.fdir, "log"),
                    FDBHOOK_LIBVIRT_NETWORK_DIRS=os.path.join(self.fdir, "networks"),
                    FDBHOOK_SOCKET=os.path.join(self.fdir, "fdbhookd.sock"), FDBHOOK_FRR_PATHSPACE=self.ns, PYTHONPATH=REPO)

    def build_bridge(self):
        ip = self.lab.ip
        ip("addr", "add", self.vtep + "/24", "dev", WIRE)
        ip("link", "set", WIRE, "up")
        self.lab.add_bridge(BRIDGE)
        ip("link", "add", VXLAN, "type", "vxlan", "id", VNI, "local", self.vtep, "dstport", VXLAN_PORT,
           "nolearning")
        ip("link", "set", VXLAN, "master", BRIDGE)
        self.lab.bridge("link", "set", "dev", VXLAN, "learning", "off")
        ip("link", "set", VXLAN, "up")

    def frr_configs(self, peers):
        return frr_configs(self.name, self.vtep, self.dir, peers, self.dad)

    def start_frr(self, peers):
        """zebra, then bgpd, in the namespace, as user frr, with -N NS (their own pid and socket paths)."""
        import grp
        import pwd

        uid, gid = pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
        zebra, bgpd = self.frr_configs(peers)
        for daemon, text in (("zebra", zebra), ("bgpd", bgpd)):
            with open(os.path.join(self.dir, daemon + ".conf"), "w") as fh:
                fh.write(text)
        run_dir = os.path.join(FRR_RUN, self.ns)
        os.makedirs(run_dir, exist_ok=True)
        os.chown(run_dir, uid, gid)
        for path in [self.dir] + [os.path.join(self.dir, f) for f in os.listdir(self.dir)]:
            os.chown(path, uid, gid)
        for daemon in ("zebra", "bgpd"):
            pidfile = os.path.join(self.dir, daemon + ".pid")
            argv = [os.path.join(FRR_BIN, daemon), "-d", "-N", self.ns, "-f",
                    os.path.join(self.dir, daemon + ".conf"), "-i", pidfile]
            # Its output to a file, never a pipe: FRR 10's daemon keeps its stderr open, and
            # a captured pipe would never reach EOF (subprocess waits until the timeout).
            start_log = os.path.join(self.dir, daemon + ".start")
            with open(start_log, "w") as out:
                proc = subprocess.run(self.lab.exec_argv(argv), stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=30)
            if proc.returncode != 0:
                with open(start_log) as out:
                    raise LabError("%s on %s: exit %d: %s" % (daemon, self.name, proc.returncode, out.read().strip()))
            if not poll(lambda: _read_pid(pidfile) is not None, timeout=10):
                raise LabError("%s on %s wrote no pid file" % (daemon, self.name))
            self.pids[daemon] = _read_pid(pidfile)
            if daemon == "zebra":
                # bgpd connects to zebra's zserv socket: let zebra listen first.
                poll(lambda: os.path.exists(os.path.join(run_dir, "zserv.api")), timeout=10)

    def stop_frr(self):
        for daemon in ("bgpd", "zebra"):
            pid = self.pids.pop(daemon, None)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not poll(lambda: not _alive(pid), timeout=5):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                poll(lambda: not _alive(pid), timeout=5)
        shutil.rmtree(os.path.join(FRR_RUN, self.ns or "-nonexistent-"), ignore_errors=True)

    def close(self):
        errors = []
        self.stop_agent()
        try:
            self.stop_frr()
        except Exception as exc:  # keep tearing down
            errors.append("%s: FRR: %s" % (self.name, exc))
        try:
            self.lab.close()
        except LabError as exc:
            errors.append(str(exc))
        return errors

    # --- fdbhook ----------------------------------------------------------------------
    def hook(self, name, op, xml=b"", driver="qemu", sub="begin"):
        """The installed hooks' entry (fdbhook.client.main): fdbhookd (the agent) first, else standalone."""
        argv = self.lab.exec_argv([sys.executable, "-c", HOOK_ENTRY, driver, name, op, sub, "-"])
        return subprocess.run(argv, input=xml, env=self.env, capture_output=True, timeout=60)

    def cli(self, *args):
        argv = self.lab.exec_argv([sys.executable, "-m", "fdbhook", *args])
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)

    def start_agent(self):
        """The pause/resume runner (fdbhookd's Pause job), warm and waiting for commands on stdin."""
        if self.agent is None:
            argv = self.lab.exec_argv([sys.executable, "-m", "tests.evpnlab", "agent"])
            self.agent = subprocess.Popen(argv, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True, cwd=REPO)
            if self.agent.stdout.readline().strip() != "ready":
                raise LabError("agent on %s did not start" % self.name)
        return self.agent

    def send_agent(self, op, name):
        """Ask the agent to pause/resume ``name`` now; returns a function that waits for its done time."""
        agent = self.start_agent()
        agent.stdin.write("%s %s\n" % (op, name))
        agent.stdin.flush()

        def wait():
            line = agent.stdout.readline().split()
            if not line or line[0] != "done":
                raise LabError("agent on %s: %s %s failed: %s" % (self.name, op, name, " ".join(line)))
            return float(line[1]), float(line[2])
        return wait

    def pause(self, name):
        return self.send_agent("pause", name)()

    def resume(self, name):
        return self.send_agent("resume", name)()

    def stop_agent(self):
        if self.agent is not None:
            agent, self.agent = self.agent, None
            with contextlib.suppress(OSError):
                agent.stdin.close()
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()

    # --- reading (iproute2 and vtysh, never fdbhook's code) ----------------------------
    def fdb_entry(self, mac):
        """The bridge's (master) entry for ``mac`` as ``bridge -j fdb show br br0`` lists it, or None."""
        for entry in self.lab.fdb(br=BRIDGE):
            if entry["mac"] == mac and "self" not in entry["flags"]:
                return entry
        return None

    def vxlan_dst(self, mac):
        """The VTEP the VXLAN device sends ``mac`` to (its own ``self`` entry), or None."""
        for entry in self.lab.fdb(dev=VXLAN):
            if entry["mac"] == mac and "self" in entry["flags"]:
                return entry.get("dst")
        return None

    def points_at(self, mac):
        """Where this host forwards ``mac``: a port name, ('vxlan', VTEP), or None."""
        entry = self.fdb_entry(mac)
        if entry is None:
            return None
        if entry["ifname"] == VXLAN:
            return (VXLAN, self.vxlan_dst(mac))
        return entry["ifname"]

    def vtysh(self, command):
        argv = [VTYSH, "-N", self.ns, "-c", command]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise LabError("vtysh on %s: %s: %s" % (self.name, command, proc.stderr.strip()))
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    def evpn_mac(self, mac):
        """FRR's view of ``mac`` in VNI 100: {'type': 'local'|'remote', ...} or None."""
        return self.vtysh("show evpn mac vni all json").get(str(VNI), {}).get("macs", {}).get(mac)

    def established(self, peers):
        summary = self.vtysh("show bgp l2vpn evpn summary json")
        got = summary.get("peers", {})
        return all(got.get(p, {}).get("state") == "Established" for p in peers)

    def remote_vteps(self):
        vteps = self.vtysh("show evpn vni %d json" % VNI).get("numRemoteVteps", 0)
        return len(vteps) if isinstance(vteps, list) else int(vteps)  # FRR 8.4 lists them


class Fabric:
    """The hosts and the switch between them; ``with Fabric(3) as fab:`` ... always torn down."""

    def __init__(self, hosts=3, sticky=None, dad=None):
        self.count = hosts
        self.sticky = sticky
        self.dad = dad
        self.hosts = []
        self.switch = None
        self.base = None
        self.socks = {}

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        errors = self.close()
        if errors and exc[0] is None:
            raise LabError("evpn lab cleanup: " + "; ".join(errors))
        return False

    def open(self):
        if not frr_installed():
            raise LabError("FRR is not installed (apt-get install frr)")
        self.base = tempfile.mkdtemp(prefix="fxe-evpn-")
        os.chmod(self.base, 0o755)
        self.switch = Lab(prefix="fxe").open()
        self.switch.add_bridge("sw")
        names = "abcdefgh"
        for i in range(self.count):
            host = Host(i, names[i], self.base, sticky=self.sticky, dad=self.dad).open()
            self.hosts.append(host)
            port = "p" + host.name
            self.switch.ip("link", "add", port, "type", "veth", "peer", "name", WIRE, "netns", host.ns)
            self.switch.ip("link", "set", port, "master", "sw")
            self.switch.ip("link", "set", port, "up")
            host.build_bridge()
            self.socks[host.name] = self._capture_socket(port)
        for host in self.hosts:
            host.start_frr([h.vtep for h in self.hosts if h is not host])
        for host in self.hosts:
            host.start_agent()
        self.wait_converged()
        return self

    def _capture_socket(self, port):
        with in_netns(self.switch.ns):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sock.setblocking(False)
        # Room for a burst of a few thousand frames (the default buffer holds about 300).
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 * 1024 * 1024)
        sock.bind((port, ETH_P_ALL))
        return sock

    def wait_converged(self, timeout=60):
        """Every BGP session up and every host's VNI 100 flood list naming the others."""
        for host in self.hosts:
            peers = [h.vtep for h in self.hosts if h is not host]
            if not poll(lambda: host.established(peers), timeout=timeout, interval=0.2):
                raise LabError("BGP on %s not established with %s" % (host.name, peers))
        for host in self.hosts:
            if not poll(lambda: host.remote_vteps() == self.count - 1, timeout=timeout, interval=0.2):
                raise LabError("VNI %d on %s: remote VTEPs %d, want %d" % (VNI, host.name, host.remote_vteps(),
                                                                          self.count - 1))

    def close(self):
        errors = []
        if self.base and os.path.isdir(self.base):
            shutil.rmtree(LAST_LOGS, ignore_errors=True)
            with contextlib.suppress(OSError):
                shutil.copytree(self.base, LAST_LOGS, ignore=shutil.ignore_patterns("*.sock", "*.pid"))
        for sock in self.socks.values():
            sock.close()
        self.socks = {}
        for host in self.hosts:
            errors += host.close()
        self.hosts = []
        if self.switch is not None:
            try:
                self.switch.close()
            except LabError as exc:
                errors.append(str(exc))
            self.switch = None
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
        return errors

    def __getitem__(self, name):
        return next(h for h in self.hosts if h.name == name)

    # --- the wire ---------------------------------------------------------------------
    def drain(self):
        for sock in self.socks.values():
            while True:
                try:
                    sock.recv(65535)
                except BlockingIOError:
                    break

    def collect(self, quiet=0.3, max_wait=10.0):
        """Every VXLAN packet the hosts sent since the last drain: [(from host, to VTEP, inner frame)]."""
        out = []
        names = {sock.fileno(): name for name, sock in self.socks.items()}
        poller = select.poll()
        for sock in self.socks.values():
            poller.register(sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + max_wait
        quiet_until = time.monotonic() + quiet
        while True:
            left = min(deadline, quiet_until) - time.monotonic()
            if left <= 0:
                return out
            for fd, _ in poller.poll(left * 1000):
                sock = self.socks[names[fd]]
                while True:
                    try:
                        data, addr = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if addr[2] == PACKET_OUTGOING:
                        continue  # the switch sending to this host: seen once already, where it came in
                    decoded = decode_vxlan(data)
                    if decoded is not None:
                        out.append((names[fd],) + decoded)
                        quiet_until = time.monotonic() + quiet


class LibvirtFabric:
    """Two libvirt hosts (tests/hostlab.py's Host: own mount/UTS/network namespace, libvirtd, fdbhookd,
    fdbhook installed by install.sh) joined by VXLAN + FRR EVPN instead of an L2 uplink.

    Names and paths are this lab's own (``fxe-l*`` namespaces, bridge
    ``fxe-br``, /tmp/fxe-hostlab, /var/cache/fxe-hostlab): hostlab's path
    constants are pointed there only while this lab is open, and hostlab's
    own cleanup (which removes its fixed ``fxd-*`` namespaces) is never
    called. FRR runs inside each host (its private /run), so a plain
    ``vtysh`` there is that host's FRR, as on a real machine.
    """

    BRIDGE = "fxe-br"
    TAP = "fxe-t1"
    SWITCH_NS = "fxe-lw"
    PATHS = {"BASE": "/tmp/fxe-hostlab", "CACHE": "/var/cache/fxe-hostlab",
             "VENV_CACHE": "/var/cache/fxe-hostlab/opt-fdbhook", "PIDS": "/tmp/fxe-hostlab/pids",
             "MIG_DIR": "/tmp/fxe-hostlab/mig", "LAST_LOGS": "/tmp/fxe-hostlab-last"}

    def __init__(self):
        self.hosts = []
        self.saved = None
        self.hostlab = None

    def __enter__(self):
        from tests import hostlab

        self.hostlab = hostlab
        self.saved = {k: getattr(hostlab, k) for k in self.PATHS}
        for key, value in self.PATHS.items():
            setattr(hostlab, key, value)
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        import uuid

        hl = self.hostlab
        hl.ensure_packages()
        shutil.rmtree(hl.BASE, ignore_errors=True)
        os.makedirs(hl.MIG_DIR)
        os.makedirs(hl.VENV_CACHE, exist_ok=True)
        for i, name in enumerate("ab"):
            host = hl.Host(name)
            host.ns = host.hostname = "fxe-l" + name
            host.root = os.path.join(hl.BASE, name)
            host.uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, "fxe-hostlab-" + name))
            host.vtep = "198.18.1.%d" % (i + 1)
            host.frr_pids = []
            self.hosts.append(host)
        self._network()
        for host in self.hosts:
            host.make_tree()
            host.start_holder()
            host.install_fdbhook(bridges=self.BRIDGE)
            with open(host.path("/etc/fdbhook/fdbhook.conf"), "a") as fh:
                fh.write("\n[metrics]\ntextfile =\n")  # not the machine's node_exporter directory
            self._start_frr(host)
            host.start_fdbhookd()
            host.start_libvirtd()
        for host in self.hosts:
            if not poll(host.daemon_watching, timeout=30, interval=0.1):
                raise LabError("host %s: fdbhookd did not connect to libvirtd" % host.name)
        for host in self.hosts:
            if not poll(lambda: self.established(host), timeout=60, interval=0.2):
                raise LabError("host %s: BGP EVPN session not established" % host.name)
        return self

    def _network(self):
        run = self.hostlab.run
        for ns in [self.SWITCH_NS] + [h.ns for h in self.hosts]:
            self.hostlab._netns(ns)
        run(["ip", "-n", self.SWITCH_NS, "link", "add", "fxe-sw", "type", "bridge"])
        run(["ip", "-n", self.SWITCH_NS, "link", "set", "fxe-sw", "up"])
        for host in self.hosts:
            peer = "fxe-w" + host.name
            self.hostlab._veth("fxe-up", host.ns, peer, self.SWITCH_NS)
            run(["ip", "-n", self.SWITCH_NS, "link", "set", peer, "master", "fxe-sw"])
            run(["ip", "-n", self.SWITCH_NS, "link", "set", peer, "up"])
            ip = ["ip", "-n", host.ns]
            run(ip + ["addr", "add", host.vtep + "/24", "dev", "fxe-up"])
            run(ip + ["link", "set", "fxe-up", "up"])
            run(ip + ["link", "add", self.BRIDGE, "type", "bridge"])
            run(ip + ["link", "set", self.BRIDGE, "up"])
            run(ip + ["link", "add", VXLAN, "type", "vxlan", "id", str(VNI), "local", host.vtep, "dstport",
                      str(VXLAN_PORT), "nolearning"])
            run(ip + ["link", "set", VXLAN, "master", self.BRIDGE])
            run(["bridge", "-n", host.ns, "link", "set", "dev", VXLAN, "learning", "off"])
            run(ip + ["link", "set", VXLAN, "up"])

    def _start_frr(self, host):
        import grp
        import pwd

        uid, gid = pwd.getpwnam("frr").pw_uid, grp.getgrnam("frr").gr_gid
        peer = next(h.vtep for h in self.hosts if h is not host)
        inside = "/var/lib/libvirt/fxe-frr"  # a host-private directory
        zebra, bgpd = frr_configs(host.hostname, host.vtep, inside, [peer])
        outside = host.path(inside)
        os.makedirs(outside, exist_ok=True)
        for daemon, text in (("zebra", zebra), ("bgpd", bgpd)):
            with open(os.path.join(outside, daemon + ".conf"), "w") as fh:
                fh.write(text)
        run_dir = host.path("/run/frr")
        os.makedirs(run_dir, exist_ok=True)
        for path in (run_dir, outside) + tuple(os.path.join(outside, f) for f in os.listdir(outside)):
            os.chown(path, uid, gid)
        for daemon in ("zebra", "bgpd"):
            # Output to a file inside the host, never the captured pipe (FRR 10 keeps stderr open).
            host.run(["sh", "-c", 'exec "$0" -d -f "$1" </dev/null >"$2" 2>&1', os.path.join(FRR_BIN, daemon),
                      "%s/%s.conf" % (inside, daemon), "%s/%s.start" % (inside, daemon)], timeout=30)
            pidfile = os.path.join(run_dir, daemon + ".pid")
            if not poll(lambda: _read_pid(pidfile) is not None, timeout=10):
                raise LabError("%s on %s wrote no pid file" % (daemon, host.name))
            host.frr_pids.append(_read_pid(pidfile))
            if daemon == "zebra":
                poll(lambda: os.path.exists(os.path.join(run_dir, "zserv.api")), timeout=10)

    def vtysh(self, host, command):
        proc = host.run([VTYSH, "-c", command], check=False, timeout=30)
        if proc.returncode != 0:
            raise LabError("vtysh on %s: %s" % (host.name, proc.stderr.strip()))
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    def established(self, host):
        peers = self.vtysh(host, "show bgp l2vpn evpn summary json").get("peers", {})
        return bool(peers) and all(p.get("state") == "Established" for p in peers.values())

    def evpn_mac(self, host, mac):
        return self.vtysh(host, "show evpn mac vni all json").get(str(VNI), {}).get("macs", {}).get(mac)

    def points_at(self, host, mac):
        entries = self.hostlab.ns_json("bridge", host.ns, "fdb", "show", "br", self.BRIDGE) or []
        master = [e for e in entries if e.get("mac") == mac and "self" not in e.get("flags", [])]
        if not master:
            return None
        if master[0].get("ifname") != VXLAN:
            return master[0].get("ifname")
        own = [e for e in self.hostlab.ns_json("bridge", host.ns, "fdb", "show", "dev", VXLAN) or []
               if e.get("mac") == mac and "self" in e.get("flags", [])]
        return (VXLAN, own[0].get("dst") if own else None)

    def migrate(self, name, src, dst):
        sock = os.path.join(self.hostlab.MIG_DIR, "%s-%s.sock" % (name, dst.name))
        return src.virsh("migrate", "--live", name, dst.uri, "--migrateuri", "unix://" + sock, timeout=300)

    def close(self):
        for host in self.hosts:
            try:
                host.stop()
            except Exception:  # cleanup goes on
                pass
            for pid in host.frr_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                if not poll(lambda: not _alive(pid), timeout=5):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            host.frr_pids = []
        for ns in [h.ns for h in self.hosts] + [self.SWITCH_NS]:
            if os.path.exists("/run/netns/" + ns):
                subprocess.run(["ip", "netns", "del", ns], check=False)
        if self.hostlab is not None and self.saved is not None:
            base = self.hostlab.BASE
            shutil.rmtree(self.PATHS["LAST_LOGS"], ignore_errors=True)
            for host in self.hosts:
                logs = os.path.join(host.root, "var", "log", "libvirt")
                if os.path.isdir(logs):
                    shutil.copytree(logs, os.path.join(self.PATHS["LAST_LOGS"], host.name),
                                    ignore_dangling_symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(base, ignore_errors=True)
            for key, value in self.saved.items():
                setattr(self.hostlab, key, value)
            self.saved = None
        self.hosts = []


def frr_configs(name, vtep, logdir, peers, dad=None):
    """(zebra.conf, bgpd.conf): iBGP AS 65000 with ``peers``, l2vpn evpn, advertise-all-vni."""
    zebra = "hostname %s\nlog file %s/zebra.log\n" % (name, logdir)
    lines = ["frr defaults datacenter", "hostname %s" % name, "log file %s/bgpd.log" % logdir,
             "router bgp %d" % ASN, " bgp router-id %s" % vtep, " no bgp default ipv4-unicast"]
    for peer in peers:
        lines += [" neighbor %s remote-as %d" % (peer, ASN), " neighbor %s timers 3 9" % peer,
                  " neighbor %s timers connect 1" % peer]
    lines.append(" address-family l2vpn evpn")
    lines += ["  neighbor %s activate" % peer for peer in peers]
    lines.append("  advertise-all-vni")
    if dad:
        lines.append("  dup-addr-detection %s" % dad)
    lines.append(" exit-address-family")
    return zebra, "\n".join(lines) + "\n"


def decode_vxlan(frame):
    """(outer destination IP, inner Ethernet frame) of a VXLAN-in-UDP/IPv4 frame, else None."""
    try:
        _, _, ethertype, payload = parse_frame(frame)
    except ValueError:
        return None
    if ethertype != 0x0800 or len(payload) < 20:
        return None
    ihl = (payload[0] & 0x0F) * 4
    if payload[9] != 17 or len(payload) < ihl + 16:
        return None
    dst_ip = socket.inet_ntoa(payload[16:20])
    _, dport = struct.unpack("!HH", payload[ihl:ihl + 4])
    if dport != VXLAN_PORT:
        return None
    return dst_ip, bytes(payload[ihl + 16:])  # UDP header 8 + VXLAN header 8


def _read_pid(path):
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours would count as alive; FRR daemons daemonize, so their parent is init.
    try:
        with open("/proc/%d/stat" % pid) as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def agent_main():
    """fdbhookd in a host's namespace (hook socket, worker, link monitor; no libvirt), driven on stdin.

    'pause NAME' / 'resume NAME' run the daemon's own SUSPENDED / RESUMED job
    (what libvirt's lifecycle events queue) and answer 'done T0 T1':
    CLOCK_MONOTONIC (one clock for every process) when the job started and
    when its kernel changes were done. EOF stops the daemon.
    """
    from fdbhook.daemon import Daemon, Pause
    from fdbhook.kernel import Kernel
    from fdbhook.logsetup import setup_logging

    setup_logging()
    daemon = Daemon(use_libvirt=False)
    daemon.start()
    kernel = Kernel()
    kernel.by_name("lo")  # open the netlink socket now, not at the first job
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if len(words) != 2 or words[0] not in ("pause", "resume"):
                print("error bad command %r" % line.strip(), flush=True)
                continue
            started = time.monotonic()
            try:
                daemon.run_job(kernel, Pause("qemu", words[1], words[0] == "pause"))
            except Exception as exc:  # the test reads the reason
                print("error %s" % exc, flush=True)
                continue
            print("done %.6f %.6f" % (started, time.monotonic()), flush=True)
    finally:
        kernel.close()
        daemon.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["agent"]:
        agent_main()
    else:
        sys.exit("usage: python -m tests.evpnlab agent")
