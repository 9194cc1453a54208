"""fdbhookd: what no hook sees, and the fast path for the hooks.

Threads, and what each may do:

* hook server (one thread per connection): serves hook invocations handed
  over by fdbhook.client through the same run_hook as the standalone hook,
  with a netlink connection taken from a small pool that stays open. It
  never calls libvirt (libvirtd is blocked on that very hook) and never
  waits for the other threads; it shares only the store's file lock.
* libvirt (fdbhook.virt.Watcher, one per URI whose driver is installed):
  callbacks only put jobs on the queue.
* kernel link monitor: a port joining a managed bridge that no record knows
  and that carries a known NIC's MAC the way libvirt addresses its taps
  (fdbhook.joined; NICs known from hook XML and libvirt's live XML) gets that
  NIC's plan at once, on this thread, through the engine; a libvirt-style
  port nothing knows yet (hotplug; the lock-down thread locks it down) is
  looked up in libvirt's live XML every few ms until libvirt names it, then
  reconciled on this thread (the apply claims it); any other
  such port queues one lookup of its guest. A managed port that vanishes
  queues the pruning of its record.
* frames: one poll loop over an AF_PACKET socket per port of an incoming
  migration (fdbhook.firstframe decides which; fdbhook.kernel.FrameSocket):
  the guest's first frame there (QEMU's announce) puts that domain's entries
  in on this thread, as RESUMED would, a few ms before libvirt says RESUMED.
* lock-down (its own event socket, so that no lookup or apply on the link
  monitor's thread delays it): a port joining a managed bridge that is
  unmistakably a guest's and that no known NIC matches gets learning and
  flood off at once, its original state pending (fdbhook.lockdown), until
  the link monitor's lookup, DEVICE_ADDED or a hook claims it; unclaimed at
  its bound, gone or off its bridge, it is settled here.
* worker: runs queued jobs one at a time, each a small frozen object, with
  its own netlink connection. It calls libvirt but never while holding the
  store lock; the reconciliation itself is fdbhook.engine's.

Every thread's target runs under ``Daemon._spawn``: an exception is logged
and the target started again (after a pause that grows to 30 s), so no bad
file, config or event can leave fdbhookd "running" with a dead thread;
``fdbhook status`` shows the restarts (the ping answer carries them).
"""

import json
import logging
import os
import queue
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

from fdbhook import engine, firstframe, virt
from fdbhook.client import MAX_STDIN, pack, socket_path as default_socket, unpack
from fdbhook.config import ConfigCache
from fdbhook.domxml import normalize_mac, parse_domain
from fdbhook.errors import FdbhookError, log_failure
from fdbhook.hook import run_hook
from fdbhook.joined import JoinedPort, libvirt_style, match_joined
from fdbhook.kernel import FrameSocket, Kernel, LinkMonitor
from fdbhook.state import Store

LOG = logging.getLogger(__name__)

DEFAULT_URIS = ("qemu:///system", "lxc:///system")
STALE_RECORD_AGE = 30.0  # a record of a domain libvirt does not list, younger than this, may be mid-start
# s after a port change: FRR is asked whether it knows the new MACs (engine.announce_to_frr);
# the rounds stop once it knows them all (or FRR is absent); the resync asks too.
ANNOUNCE_AFTER = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
SWITCH_INTERVAL = 0.0005  # s (Python's default: 0.005)
FRAMES_RTPRIO = 1  # SCHED_FIFO priority of the first-frame thread, when allowed (the lowest)
STOP_WAIT = 3.0  # s: at stop, the lock-down thread's longest wait (1 s) and a lock-down in progress
LOOKUP_FOR = 2.0  # s: the link monitor looks this long for the guest of a libvirt-style port libvirt has not named
HOOK_OPS_CHANGING_PORTS = ("start", "started", "reconnect")
HOOK_OPS_KNOWING_NICS = ("migrate", "prepare", "start", "started", "reconnect")  # their XML names the NICs to come
HOOK_OPS_ENDING = ("stopped", "release")


# --- jobs ------------------------------------------------------------------------

@dataclass(frozen=True)
class Resync:
    """Compare every record with the kernel and repair drift."""


@dataclass(frozen=True)
class Sync:
    """After (re)connecting to ``uri``: every running domain reconciled, stale records torn down."""

    uri: str


@dataclass(frozen=True)
class Reconcile:
    """One domain from its live XML; ``alias``/``port`` limit it to one NIC."""

    uri: str
    name: str
    alias: Optional[str] = None
    port: Optional[str] = None


@dataclass(frozen=True)
class MacChange:
    """The guest set a new MAC on NIC ``alias`` (NIC_MAC_CHANGE, libvirt >= 11.2)."""

    uri: str
    name: str
    alias: str
    old: str
    new: str


@dataclass(frozen=True)
class Pause:
    """SUSPENDED (True) or RESUMED (False): entries out or back in. Never deduplicated: order matters."""

    driver: str
    name: str
    paused: bool


@dataclass(frozen=True)
class PortJoined:
    """A port no record knows joined a managed bridge: find its guest."""

    port: str


@dataclass(frozen=True)
class PortGone:
    """A managed port vanished: prune its record."""

    ifindex: int


@dataclass(frozen=True)
class Announce:
    """Does FRR know every running guest's MAC on a VXLAN bridge? Announce again those it missed."""


@dataclass(frozen=True)
class Stop:
    pass


class KernelPool:
    """Netlink connections kept open for the hook server's threads (one per concurrent hook)."""

    def __init__(self):
        self._free = []
        self._lock = threading.Lock()

    def take(self):
        with self._lock:
            kernel = self._free.pop() if self._free else Kernel()
        kernel.forget()  # the reads of its last hook are old news
        return kernel

    def give(self, kernel, broken=False):
        if broken:
            kernel.close()
            return
        with self._lock:
            self._free.append(kernel)

    def close(self):
        with self._lock:
            for kernel in self._free:
                kernel.close()
            self._free = []


# --- the hook server -----------------------------------------------------------------

class _HookHandler(socketserver.StreamRequestHandler):
    def handle(self):
        daemon = self.server.fdbhookd
        try:
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != 0:
                self._answer(2, "", "fdbhook: fdbhookd serves root only")
                return
            # The client shuts down its sending side: read to EOF, bounded in
            # size and time while reading. Too slow or too big: the connection
            # is closed unanswered and the hook serves itself (the parser then
            # refuses an oversized XML with its own line).
            raw = read_request(self.request, REQUEST_LIMIT, READ_DEADLINE)
            self.request.settimeout(ANSWER_DEADLINE)  # the client reads its answer at once
        except (OSError, RequestRefused) as exc:
            LOG.warning("hook connection dropped: %s", exc)
            trim_heap()  # an oversized request's buffer is gone: hand its memory back
            return
        try:
            driver, argv, data = decode_request(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self._answer(2, "", "fdbhook: bad request to fdbhookd: %s" % exc)
            return
        finally:
            if len(raw) > TRIM_AFTER:
                del raw
                trim_heap()
        if driver == "ping":  # `fdbhook status` asking whether we run: no hook, no capture
            self._answer(0, json.dumps(daemon.health(), sort_keys=True), "")
            return
        result = daemon.serve_hook(driver, argv, data)
        self._answer(result.code, result.stdout, result.stderr)
        daemon.note_hook(driver, argv, data)
        if driver in ("qemu", "lxc") and len(argv) > 1 and argv[1] in HOOK_OPS_CHANGING_PORTS + HOOK_OPS_ENDING:
            daemon.note_ports_changed()

    def _answer(self, code, out, err):
        try:
            self.wfile.write(pack(str(code).encode(), out.encode(), err.encode()))
            self.wfile.flush()
            # The client reads to EOF: end the answer now, before any
            # bookkeeping this thread still does.
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass


REQUEST_LIMIT = MAX_STDIN + 64 * 1024  # the XML one byte over its limit, plus argv and framing
READ_DEADLINE = 2.0  # seconds a client has to send its whole request
ANSWER_DEADLINE = 10.0  # seconds a client has to take its answer
MAX_CONNECTIONS = 256  # concurrent hook connections; beyond, a connection is closed at once (the hook serves itself)
TRIM_AFTER = 1024 * 1024  # a request larger than this hands its heap back to the system afterwards


class RequestRefused(Exception):
    pass


def read_request(sock, limit, deadline):
    """Bytes up to the client's EOF: RequestRefused past ``limit`` bytes or ``deadline`` seconds."""
    end = time.monotonic() + deadline
    buf = bytearray()
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise RequestRefused("no complete request within %.0f s" % deadline)
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise RequestRefused("no complete request within %.0f s" % deadline) from None
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise RequestRefused("request over %d bytes" % limit)


def trim_heap():
    """Give freed heap back to the system (glibc malloc_trim); a no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def decode_request(raw):
    """(driver, argv list, stdin bytes) from the client's framed request; ValueError if malformed."""
    driver, argv, data = unpack(raw, 3)
    argv = argv.decode("utf-8", "surrogateescape").split("\0") if argv else []
    return driver.decode(), argv, data


class _Bounded:
    """At most MAX_CONNECTIONS hook connections at once; one more is closed unanswered (the hook falls back)."""

    _slots = None

    def process_request(self, request, client_address):
        if self._slots is None:
            self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server(_Bounded, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    # 200 hooks arriving at once queue here instead of being refused (the
    # kernel caps it at net.core.somaxconn, 4096 on these kernels).
    request_queue_size = 1024


# --- the daemon ------------------------------------------------------------------------

class Daemon:
    def __init__(self, config_path=None, socket_path=None, uris=DEFAULT_URIS, use_libvirt=True):
        self.configs = ConfigCache(config_path)
        self.socket_path = socket_path or default_socket()
        self.uris = tuple(uris)
        self.use_libvirt = use_libvirt
        self.jobs = queue.Queue()
        self._pending = set()  # queued jobs, so a burst of events for one domain runs it once
        self._pending_lock = threading.Lock()
        self.stopping = threading.Event()
        self.hooks_served = 0
        self.repairs = 0
        self.mac_changes = 0
        self.lockdowns = 0  # guest ports locked down at their join (fdbhook.lockdown)
        self._monitors = {}  # thread name -> LinkMonitor opened at start-up
        self._threads = {}  # thread name -> its Thread
        self._lockdowns = {}  # lock-down thread only: locked-down port ifindex -> monotonic time of its bound
        self._known_ports = set()
        self._known_lock = threading.Lock()
        self._frames_want = {}  # ifindex -> firstframe.Watch: ports of incoming migrations
        self._frames_wake = None  # the frames thread's pipe (read end, write end): look again
        self._pause_lock = threading.RLock()  # RESUMED/SUSPENDED jobs vs the first frame of an incoming guest
        self._last_pause = {}  # (driver, name) -> when its last SUSPENDED/RESUMED job started (for the log)
        self.first_frames = 0
        self.frames_unavailable = ""  # why no first-frame socket can be opened here (start-up probe), or ""
        self._guests = {}  # (driver, name) -> (Domain, when): NICs whose ports may join before libvirt says whose
        self._guests_lock = threading.Lock()
        self.watchers = {}  # uri -> virt.Watcher
        self._connected = set()  # URIs connected at least once
        self.kernels = KernelPool()
        self._server = None
        self.metrics = self.exporter = None  # fdbhook.metrics, when python3-prometheus-client is there
        self.restarts = {}  # thread name -> [times restarted, last error]
        self.restart_pause = 1.0  # seconds before the first restart of a failed thread (doubles, up to 30)
        self._announce_wake = threading.Event()  # set: ports changed, start the Announce rounds again
        self.frr_unknown = 0  # MACs FRR did not know at the last Announce

    # --- shared helpers ----------------------------------------------------------------
    def put(self, job):
        """Queue a job unless the same one is already waiting (Pause jobs always go in order)."""
        if not isinstance(job, (Pause, Stop)):
            with self._pending_lock:
                if job in self._pending:
                    return
                self._pending.add(job)
        self.jobs.put(job)

    def config(self):
        return self.configs.get()

    def store(self, config=None):
        return Store((config or self.config()).state_dir)

    def health(self):
        """What `fdbhook status` shows about fdbhookd itself (JSON-ready)."""
        config = self.config()
        return {"threads_restarted": {name: {"count": n, "error": err} for name, (n, err) in self.restarts.items()},
                "config_fallback": config.fallback, "hooks_served": self.hooks_served,
                "first_frames_unavailable": self.frames_unavailable}

    def note_ports_changed(self):
        """Refresh the set of ports that records know (link monitor) and those of incoming guests (frames)."""
        try:
            store = self.store()
            records = store.all()
            incoming = {(r.driver, r.domain) for r in records if r.paused and store.is_incoming(r.driver, r.domain)}
        except Exception:  # never fatal to the caller (a hook answer, a job): the next call refreshes
            LOG.exception("cannot read the records")
            return
        ports = {nic.ifindex for record in records for nic in record.nics}
        want = firstframe.wanted(records, incoming)
        with self._known_lock:
            self._known_ports = ports
            changed, self._frames_want = want != self._frames_want, want
        self._announce_wake.set()
        if changed or want:  # while a guest is incoming, a record written may need its resume planned again
            self._wake_frames()

    def _wake_frames(self):
        with self._known_lock:
            if self._frames_wake is not None:
                try:
                    os.write(self._frames_wake[1], b"x")
                except OSError:  # the pipe is full: the thread wakes anyway
                    pass

    def know_domain(self, domain):
        """Remember a domain's NICs (hook or live XML) for ports that join before anyone says whose."""
        with self._guests_lock:
            self._guests[(domain.driver, domain.name)] = (domain, time.monotonic())

    def forget_domain(self, driver, name):
        with self._guests_lock:
            self._guests.pop((driver, name), None)

    def known_domains(self):
        with self._guests_lock:
            return [domain for domain, _ in self._guests.values()]

    def note_hook(self, driver, argv, data):
        """After a qemu/lxc hook's answer: its XML tells which NICs are about to get ports, or that none remain."""
        if driver not in ("qemu", "lxc") or len(argv) < 2:
            return
        if argv[1] in HOOK_OPS_ENDING:
            self.forget_domain(driver, argv[0])
        elif argv[1] in HOOK_OPS_KNOWING_NICS:
            try:
                self.know_domain(parse_domain(data, driver=driver, what=argv[0]))
            except FdbhookError:
                pass  # the hook itself said what is wrong with it

    def serve_hook(self, driver, argv, data):
        """One hook call, on a pooled netlink connection. Never raises (run_hook does not)."""
        started = time.monotonic()
        kernel = self.kernels.take()
        broken = False
        try:
            result = run_hook(driver, argv, data, config=self.config(), kernel=kernel, daemon=True)
        except Exception:  # pragma: no cover - run_hook catches everything; the socket must still answer
            LOG.exception("hook %s %s", driver, " ".join(argv[:2]))
            broken = True
            raise
        finally:
            self.kernels.give(kernel, broken)
        self.hooks_served += 1
        if self.metrics is not None:
            self.metrics.hook_served(driver, argv, result.code, time.monotonic() - started)
            self.exporter.touch()
        LOG.debug("served %s %s in %.1f ms -> %d", driver, " ".join(argv[:2]),
                  (time.monotonic() - started) * 1000, result.code)
        return result

    # --- lifecycle ----------------------------------------------------------------------
    def start(self):
        # A thread waiting for the GIL gets it after this long at most: the lock-down thread needs it a few
        # times per port (each syscall hands it back) while the link monitor or the worker parse XML.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._recover()
        store = self.store()
        try:
            with store.lock():
                store.clean_temp_files()
        except Exception as exc:  # a full or read-only state dir must not stop fdbhookd
            LOG.error("state %s: %s", store.state_dir, exc)
        self.note_ports_changed()
        self._start_metrics()
        self._open_monitors()  # before the socket says "ready": no port joining from then on goes unseen
        self.frames_unavailable = FrameSocket.unavailable()
        if self.frames_unavailable:  # RESUMED still puts an incoming guest's entries in, later
            LOG.warning("no first-frame watch for incoming migrations: %s", self.frames_unavailable)
        self._start_server()
        sd_notify("READY=1\nSTATUS=serving hooks on %s" % self.socket_path)  # Type=notify: libvirtd may start
        self._spawn("worker", self._worker)
        self._spawn("links", self._link_monitor)
        self._spawn("frames", self._frame_watcher)
        self._spawn("lockdown", self._lockdown_monitor)
        if self.use_libvirt:
            self._start_libvirt()
        self._spawn("resync", self._resync_timer)
        self._spawn("announce", self._announce_timer)
        self.put(Resync())
        LOG.info("fdbhookd running: socket %s, libvirt %s", self.socket_path,
                 " ".join(self.watchers) if self.watchers else "off")

    def _open_monitors(self):
        for name in ("links", "lockdown"):
            try:
                self._monitors[name] = LinkMonitor()
            except OSError as exc:  # the thread tries again itself
                LOG.error("kernel link events: %s", exc)

    def _monitor(self, name):
        """The event socket opened at start-up for thread ``name`` (once), else a new one (a restarted thread)."""
        monitor = self._monitors.pop(name, None)
        return monitor if monitor is not None else LinkMonitor()

    def _recover(self):
        """Finish or undo what a killed run (hook, fdbhookd) left, before serving anything."""
        from fdbhook.txn import needs_recovery, recover

        try:
            store = self.store()
            if needs_recovery(store):
                with Kernel() as kernel, store.lock():
                    # pending lock-downs of a dead fdbhookd: put back (the sync applies what libvirt knows)
                    recover(kernel, store, all_pending=True)
        except Exception as exc:  # the worker's first resync tries again
            LOG.error("recovering interrupted operations at start-up failed: %s", exc)

    def _start_libvirt(self):
        if not virt.start_event_loop(self.stopping):
            LOG.warning("libvirt-python missing: no hotplug/pause/resume/MAC events, hooks and drift repair only")
            return
        for uri in self.uris:
            if not virt.driver_installed(uri):
                # Trying anyway would leave two error lines in libvirtd's log every 30 s.
                LOG.info("libvirt %s: its driver is not installed here; not watched", uri)
                continue
            watcher = virt.Watcher(uri, self, self.stopping)
            self.watchers[uri] = watcher
            self._spawn("libvirt %s" % uri, watcher.run)

    def _start_metrics(self):
        try:
            from fdbhook.metrics import Exporter, Metrics
            self.metrics = Metrics()
        except ImportError as exc:
            LOG.warning("metrics off: %s (install python3-prometheus-client)", exc)
            return
        self.exporter = Exporter(self.metrics, self.config, lambda kernel: (self.store().all(), kernel.links()),
                                 self.stopping)
        if self.config().metrics_listen:
            self.exporter.start_http(self.config().metrics_listen)
        self._spawn("metrics", self.exporter.run)

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=self._survive, args=(name, target) + args, name=name, daemon=True)
        self._threads[name] = thread
        thread.start()

    def _survive(self, name, target, *args):
        """Run ``target`` until fdbhookd stops: an exception is logged and the target runs again."""
        pause = self.restart_pause
        while True:
            try:
                target(*args)
                return  # a target returns only when fdbhookd stops
            except Exception as exc:  # a thread must outlive anything a file, config or event can raise
                if self.stopping.is_set():
                    return
                count = self.restarts.get(name, (0, ""))[0] + 1
                self.restarts[name] = (count, "%s: %s" % (exc.__class__.__name__, exc))
                log_failure(LOG, exc, "thread %s failed (restart %d in %.0f s)", name, count, pause)
                if self.stopping.wait(pause):
                    return
                pause = min(pause * 2, 30.0)

    def stop(self):
        sd_notify("STOPPING=1")
        self.stopping.set()
        self._announce_wake.set()  # the announce thread leaves its wait
        self.jobs.put(Stop())
        self._wake_frames()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        for watcher in self.watchers.values():
            watcher.close()
        self._put_back_at_stop()
        self.kernels.close()

    def _put_back_at_stop(self):
        """Ports still locked down go back as they were now, not at the next start: fdbhookd may not start
        again (the package removed, an older version that knows no predicted entry installed). Once the
        lock-down thread is gone (it writes without the store lock); else the next run settles them."""
        thread = self._threads.get("lockdown")
        if thread is not None:
            thread.join(STOP_WAIT)
            if thread.is_alive():
                LOG.warning("locked-down ports left for the next run: the lock-down thread did not stop")
                return
        try:
            if not self.store().pending():
                return
            with Kernel() as kernel:
                self._settle_lockdowns(kernel, None, everything=True)
        except Exception as exc:  # the next run (hook, fdbhookd, status) settles them
            LOG.error("putting locked-down ports back at stop failed: %s", exc)

    def run_forever(self):
        signal.signal(signal.SIGTERM, lambda *a: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *a: self.stopping.set())
        self.start()
        while not self.stopping.wait(1.0):
            pass
        LOG.info("fdbhookd stopping")
        self.stop()
        return 0

    def _start_server(self):
        from fdbhook.errors import StateError
        from fdbhook.safefile import UnsafePath, ensure_dir
        try:
            ensure_dir(os.path.dirname(os.path.abspath(self.socket_path)), 0o700)  # root's own, never a link
        except UnsafePath as exc:
            raise StateError(path=exc.path, reason=exc.reason) from None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        old = os.umask(0o077)  # root-only socket
        try:
            self._server = _Server(self.socket_path, _HookHandler)
        finally:
            os.umask(old)
        self._server.fdbhookd = self
        self._spawn("hook-server", self._server.serve_forever, 0.5)

    # --- libvirt events (called on the event thread: queue only) ----------------------------
    def connected(self, uri):
        self.put(Sync(uri))
        first = uri not in self._connected
        self._connected.add(uri)
        for other in list(self.watchers.values()) if not first else ():
            if other.uri != uri:
                other.kick()  # reconnected: libvirtd restarted, a driver it lacked may be there now

    def lifecycle(self, uri, name, event):
        if event in ("suspended", "resumed"):
            self.put(Pause(virt.driver_of(uri), name, event == "suspended"))
        else:
            self.put(Reconcile(uri, name))

    def device_added(self, uri, name, alias):
        self.put(Reconcile(uri, name, alias=alias))

    def device_removed(self, uri, name, alias):
        self.put(Reconcile(uri, name, alias="-"))  # no NIC has alias "-": prune only

    def mac_changed(self, uri, name, alias, old, new):
        LOG.info("%s/%s: guest changed %s MAC %s -> %s", virt.driver_of(uri), name, alias, old, new)
        self.put(MacChange(uri, name, alias, old, new))

    # --- worker -----------------------------------------------------------------------------
    def _worker(self):
        kernel = Kernel()
        while not self.stopping.is_set():
            job = self.jobs.get()
            if isinstance(job, Stop):
                break
            with self._pending_lock:
                self._pending.discard(job)
            started = time.monotonic()
            try:
                self.run_job(kernel, job)
            except Exception as exc:
                log_failure(LOG, exc, "job %s failed", job)
                kernel.close()
                kernel = Kernel()
            if self.exporter is not None:
                self.exporter.touch()
            LOG.debug("job %s took %.1f ms (%d queued)", job, (time.monotonic() - started) * 1000,
                      self.jobs.qsize())
        kernel.close()

    def run_job(self, kernel, job):
        kernel.forget()  # a job reads the kernel afresh (the engine's operations forget too)
        config = self.config()
        store = self.store(config)
        if isinstance(job, Resync):
            self._resync(kernel, store, config)
        elif isinstance(job, Sync):
            self._sync(kernel, store, config, job.uri)
        elif isinstance(job, Reconcile):
            self._reconcile(kernel, store, config, job.uri, job.name, alias=job.alias, port=job.port)
        elif isinstance(job, MacChange):
            self.mac_changes += 1
            if self.metrics is not None:
                self.metrics.mac_changed()
            self._reconcile(kernel, store, config, job.uri, job.name, alias=job.alias,
                            new_mac=(job.alias, job.new))
        elif isinstance(job, Pause):
            with self._pause_lock:
                self._last_pause[(job.driver, job.name)] = time.monotonic()
                engine.reapply_record(job.driver, job.name, kernel, store, config, paused=job.paused)
                if not job.paused:
                    store.clear_incoming(job.driver, job.name)
            self.note_ports_changed()
        elif isinstance(job, PortJoined):
            self._port_joined(kernel, store, config, job.port)
        elif isinstance(job, PortGone):
            engine.prune_port(kernel, store, config, job.ifindex)
            self.note_ports_changed()
        if isinstance(job, Announce):
            self._announce(kernel, store)
        else:  # a job may have added entries (a resume, a hotplug, a repair): FRR must know them
            self._announce_wake.set()

    def _announce(self, kernel, store):
        from fdbhook.evpn import read_macs

        unknown = 1  # an error: the next round asks again
        try:
            _, unknown = engine.announce_to_frr(kernel, store, read_macs)
        finally:
            self.frr_unknown = unknown

    def _resync(self, kernel, store, config):
        started = time.monotonic()
        checked, repaired, failed = engine.resync(kernel, store, config)
        self.repairs += repaired
        if self.metrics is not None:
            self.metrics.resync_done(checked, repaired, failed)
        LOG.log(logging.INFO if repaired or failed else logging.DEBUG,
                "resync: %d ports checked, %d repaired, %d failed in %.0f ms",
                checked, repaired, failed, (time.monotonic() - started) * 1000)
        self.note_ports_changed()

    def _reconcile(self, kernel, store, config, uri, name, alias=None, port=None, new_mac=None, trust_live=False):
        watcher = self.watchers.get(uri)
        live = watcher.live(name) if watcher is not None else None
        if live is None:
            return
        xml, state = live
        domain = parse_domain(xml, driver=watcher.driver, what=name)
        self.know_domain(domain)
        if new_mac is not None:
            domain = with_guest_mac(domain, *new_mac)
        paused = None if state == "starting" else state == "paused"
        engine.reconcile(domain, paused, config, kernel, store, alias=alias, port=port, trust_live=trust_live)
        self.note_ports_changed()

    def _sync(self, kernel, store, config, uri):
        watcher = self.watchers.get(uri)
        names = watcher.running() if watcher is not None else None
        if names is None:
            return
        for name in names:
            self._reconcile(kernel, store, config, uri, name, trust_live=True)
        self._forget_stopped(watcher.driver, names)
        for record in engine.stale_records(store, watcher.driver, names, STALE_RECORD_AGE):
            LOG.info("%s/%s: not running any more; tearing down its record", record.driver, record.domain)
            engine.teardown_domain(record.driver, record.domain, kernel, store)
        self.note_ports_changed()

    def _forget_stopped(self, driver, running, now=None):
        """Known domains of ``driver`` that libvirt does not list, unless young enough to be mid-start."""
        now = time.monotonic() if now is None else now
        with self._guests_lock:
            for key, (_, when) in list(self._guests.items()):
                if key[0] == driver and key[1] not in running and now - when > STALE_RECORD_AGE:
                    del self._guests[key]

    def _port_joined(self, kernel, store, config, port):
        for uri, watcher in list(self.watchers.items()):
            name = watcher.owner_of(port)
            if name is not None:
                self._reconcile(kernel, store, config, uri, name, port=port)
                return

    # --- kernel link monitor ----------------------------------------------------------------
    def _link_monitor(self):
        monitor = self._monitor("links")
        kernel = Kernel()
        bridges = {}  # ifindex -> name of a bridge, or None
        asked = {}  # port ifindex -> when we last looked for its guest
        pending = {}  # port ifindex -> (name, until): libvirt-style ports whose NIC libvirt has not listed yet
        # port ifindex -> its master as last seen, read after the socket opened: only a change of master
        # is a join (not our own apply's or teardown's flag change of a port already on the bridge)
        masters = {link.ifindex: link.master for link in kernel.links()}
        wait = 0.002
        try:
            while not self.stopping.is_set():
                ready, _, _ = select.select([monitor], [], [], wait if pending else 1.0)
                if ready:
                    self._link_events(kernel, monitor.read(), bridges, asked, pending, masters)
                if pending:
                    # libvirt lists a hot-plugged NIC only once QEMU has it, then sends DEVICE_ADDED:
                    # look every few ms meanwhile, never spending more than a third of the time on it.
                    started = time.monotonic()
                    try:
                        self._look_up_joined(kernel, pending)
                    except Exception as exc:  # DEVICE_ADDED still comes; the monitor must not die of a lookup
                        log_failure(LOG, exc, "looking up joined ports %s",
                                    sorted(name for name, _ in pending.values()))
                        pending.clear()
                    wait = max(0.002, 2 * (time.monotonic() - started))
        finally:
            monitor.close()
            kernel.close()

    def _link_events(self, kernel, events, bridges, asked, pending=None, masters=None):
        with self._known_lock:
            known = self._known_ports
        for event, ifindex, _, _ in events:
            if event == "del" and ifindex in known:
                self.put(PortGone(ifindex))
        config = None
        for event, ifindex, port, master in events:
            if masters is not None and not _is_join(masters, event, ifindex, master):
                continue  # gone, off its bridge, or a port already on that bridge changed (flags)
            if event != "new" or not master or not port or ifindex in known:
                continue
            if master not in bridges:
                link = kernel.by_index(master)
                bridges[master] = link.name if link is not None and link.kind == "bridge" else None
            config = config or self.config()
            now = time.monotonic()
            if bridges[master] and (config.bridge_managed(bridges[master]) or config.networks) \
                    and now - asked.get(ifindex, -60.0) > 5.0:
                asked[ifindex] = now
                try:
                    how = self._joined(kernel, config, ifindex, bridges[master])
                except (FdbhookError, OSError) as exc:  # a bad record, a kernel error: libvirt's way still works
                    LOG.warning("port %s joined %s: %s", port, bridges[master], exc)
                    how = None
                except Exception:  # never the link monitor's end: libvirt's way still works
                    LOG.exception("port %s joined %s", port, bridges[master])
                    how = None
                if how == "lookup" and pending is not None and self.watchers:
                    pending[ifindex] = (port, now + LOOKUP_FOR)
                elif how != "applied":
                    self.put(PortJoined(port))

    @staticmethod
    def _joined_port(kernel, ifindex, bridge):
        """(Link, its veth peer or None, JoinedPort) of a port that joined ``bridge``; None if not a tap/veth."""
        kernel.forget()
        link = kernel.by_index(ifindex)
        if link is None or link.kind not in ("tun", "veth"):
            return None
        peer = None
        if link.kind == "veth" and link.peer:
            peer = kernel.by_index(link.peer)
            # Both ends still in our namespace (libvirt moves the container end later): the peer points back.
            peer = peer if peer is not None and peer.peer == ifindex and peer.mac else None
        port = JoinedPort(link.name, link.kind, link.mac, bridge, peer.mac if peer is not None else None,
                          peer.kind if peer is not None else None)
        return link, peer, port

    def _joined(self, kernel, config, ifindex, bridge):
        """A port joined a managed bridge: "applied" (it carries a known NIC's MAC, see fdbhook.joined),
        "lookup" (libvirt-style, NIC not known yet) or None."""
        joined = self._joined_port(kernel, ifindex, bridge)
        if joined is None:
            return None
        link, _, port = joined
        match = match_joined(port, self.known_domains())
        if match is None:
            return "lookup" if libvirt_style(port) else None
        domain = match.domain
        store = self.store(config)
        record = store.load(domain.driver, domain.name)
        paused = record.paused if record is not None else store.is_incoming(domain.driver, domain.name)
        LOG.debug("%s/%s: %s joined %s, carrying %s's MAC: applying now", domain.driver, domain.name,
                  link.name, bridge, match.nic.label)
        engine.apply_domain(domain, config, kernel, store, paused=paused, prune=False)
        self.note_ports_changed()
        return "applied"

    def _managed_bridge(self, config, bridge):
        if config.bridge_managed(bridge):
            return True
        if not config.networks:
            return False
        from fdbhook.resolve import load_networks
        return any(net.bridge == bridge for net in load_networks(list(config.networks), config.network_dirs).values())

    # --- lock-down at the join: its own thread and event socket, so that no lookup or apply on the link
    # monitor's thread (libvirt's live XML, a reconcile) ever delays it ---------------------------------
    def _lockdown_monitor(self):
        monitor = self._monitor("lockdown")
        kernel = Kernel()
        bridges = {}  # bridge ifindex -> name or None
        # port ifindex -> its master as last seen: only a change of master is a join (a flag change of a
        # port already on the bridge, e.g. a teardown putting it back, is not); read after the socket opened
        masters = {link.ifindex: link.master for link in kernel.links()}
        try:
            while not self.stopping.is_set():
                timeout = 1.0
                if self._lockdowns:
                    timeout = max(0.0, min(timeout, min(self._lockdowns.values()) - time.monotonic() + 0.05))
                ready, _, _ = select.select([monitor], [], [], timeout)
                if ready:
                    woke = time.monotonic()
                    self._lockdown_events(kernel, monitor.read(), bridges, masters, woke)
                if self._lockdowns:
                    now = time.monotonic()
                    self._settle_lockdowns(kernel, {i for i, until in self._lockdowns.items() if now > until})
        finally:
            monitor.close()
            kernel.close()

    def _lockdown_events(self, kernel, events, bridges, masters, woke=None):
        """Lock down each unknown guest port that joined a managed bridge; settle those that left."""
        with self._known_lock:
            known = self._known_ports
        left = {i for event, i, _, master in events if i in self._lockdowns and (event == "del" or not master)}
        self._settle_lockdowns(kernel, left)  # gone or off its bridge: its pending record goes
        config = self.config()
        for event, ifindex, port, master in events:
            if not _is_join(masters, event, ifindex, master) or not port or ifindex in known \
                    or ifindex in self._lockdowns or config.hotplug_lockdown <= 0:
                continue
            if master not in bridges:
                link = kernel.by_index(master)
                bridges[master] = link.name if link is not None and link.kind == "bridge" else None
            if not bridges[master] or not self._managed_bridge(config, bridges[master]):
                continue
            try:
                self._lock_down(kernel, config, ifindex, bridges[master], master, woke)
            except (FdbhookError, OSError) as exc:
                LOG.warning("port %s joined %s: %s", port, bridges[master], exc)
            except Exception:  # never this thread's end
                LOG.exception("port %s joined %s", port, bridges[master])

    def _lock_down(self, kernel, config, ifindex, bridge, bridge_ifindex, woke=None):
        """A guest's port nobody knows yet: learning and flood off now (fdbhook.lockdown), until its NIC
        is known (the apply takes it over) or the bound passes (put back as it was). A port a known NIC
        matches is left to the link monitor, which applies its plan."""
        from fdbhook import lockdown

        joined = self._joined_port(kernel, ifindex, bridge)
        if joined is None:
            return
        link, peer, port = joined
        domains = self.known_domains()
        if not libvirt_style(port) or match_joined(port, domains) is not None:
            return
        target_devs = frozenset(nic.target_dev for d in domains for nic in d.nics if nic.target_dev)
        taken = frozenset(mac for d in domains for nic in d.nics
                          for mac in (nic.mac, nic.config_mac) + tuple(nic.extra_macs) if mac)
        woke = time.monotonic() if woke is None else woke
        marks = {"port read": time.monotonic()}
        try:
            decision = lockdown.lock_down(kernel, self.store(config), config, link, bridge, bridge_ifindex, peer,
                                          target_devs, read_now=False, taken=taken, marks=marks)  # port read
        except FdbhookError as exc:  # a pending record may be there: settled at the bound like any other
            self._lockdowns[link.ifindex] = time.monotonic() + config.hotplug_lockdown
            LOG.error("%s joined %s: locking it down failed: %s", link.name, bridge, exc)
            return
        if decision.lock:
            self._lockdowns[link.ifindex] = time.monotonic() + config.hotplug_lockdown
            self.lockdowns += 1
            split = ", ".join("%s %.1f" % (k, (t - woke) * 1000) for k, t in marks.items())
            LOG.info("%s joined %s: locked down until its NIC is known: %s (%.1f ms after its event was read: %s)",
                     link.name, bridge, decision.why, (time.monotonic() - woke) * 1000, split)
        else:
            LOG.debug("%s joined %s: not locked down: %s", link.name, bridge, decision.why)

    def _settle_lockdowns(self, kernel, ifindexes, everything=False):
        """Locked-down ports past their bound, gone or off their bridge: settled (fdbhook.lockdown.settle).
        ``ifindexes`` None: every pending port; ``everything``: put back whatever its bound (a stop)."""
        from fdbhook import lockdown

        if ifindexes is not None and not ifindexes:
            return
        for ifindex in list(self._lockdowns) if ifindexes is None else ifindexes:
            self._lockdowns.pop(ifindex, None)
        try:
            store = self.store()
            with store.lock():
                done = lockdown.settle(kernel, store, only=None if ifindexes is None else set(ifindexes),
                                       everything=everything)
        except FdbhookError as exc:  # the next run (a resync, a hook) settles it
            LOG.error("settling locked-down ports: %s", exc)
            return
        for ifindex, what in sorted(done.items()):
            LOG.debug("locked-down port %d: %s", ifindex, what)

    def _look_up_joined(self, kernel, pending):
        """Ask libvirt whose the pending ports are; reconcile each one found, on this thread."""
        with self._known_lock:
            known = self._known_ports
        now = time.monotonic()
        for ifindex, (_, until) in list(pending.items()):
            if ifindex in known or now > until:  # DEVICE_ADDED was faster, or it is not a guest's after all
                del pending[ifindex]
        ports = {name: ifindex for ifindex, (name, _) in pending.items()}
        if not ports:
            return
        config = self.config()
        store = self.store(config)
        for uri, watcher in list(self.watchers.items()):
            for port, name in watcher.owners_of(ports).items():
                pending.pop(ports[port], None)
                try:
                    self._reconcile(kernel, store, config, uri, name, port=port)
                except (FdbhookError, OSError) as exc:
                    LOG.warning("port %s of %s: %s", port, name, exc)

    def _announce_timer(self):
        """After every change of ports, Announce jobs at ANNOUNCE_AFTER until FRR knows every MAC."""
        while not self.stopping.is_set():
            self._announce_wake.wait()
            self._announce_wake.clear()
            for delay in ANNOUNCE_AFTER:
                if self.stopping.wait(delay) or self._announce_wake.is_set():
                    break  # stopping, or ports changed again: start over
                self.frr_unknown = -1
                self.put(Announce())
                while self.frr_unknown == -1 and not self.stopping.wait(0.05) and not self._announce_wake.is_set():
                    pass
                if self.frr_unknown == 0:
                    break

    # --- first frames of incoming guests -------------------------------------------------------
    def _frame_watcher(self):
        """One poll loop for every watched port (see fdbhook.firstframe)."""
        frames = firstframe.FirstFrames()
        socks = {}  # ifindex -> FrameSocket
        poller = select.poll()
        wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with self._known_lock:
            self._frames_wake = wake
        poller.register(wake[0], select.POLLIN)
        kernel = Kernel()  # opens its netlink socket on first use
        armed, tried = {}, set()  # (driver, name) -> engine.Armed; domains armed or tried while watched
        _realtime("frames")
        try:
            while not self.stopping.is_set():
                self._update_frame_sockets(frames, socks, poller)
                self._arm_watched(frames, armed, tried, kernel)
                ready = [fd for fd, _ in poller.poll(1000 if socks else 30000)]
                arrived_at, woke = time.monotonic(), time.time()
                if any(fd != wake[0] for fd in ready):
                    # A frame: hold the pause lock before anything else (no syscall, no GIL hand-over
                    # in between), so a RESUMED job that libvirt delivers meanwhile waits and finds it done.
                    with self._pause_lock:
                        self._frames_arrived(frames, socks, poller, ready, kernel, (arrived_at, woke), armed)
                if wake[0] in ready:
                    _drain_pipe(wake[0])
        finally:
            for ifindex in list(socks):
                self._close_frame_socket(socks, poller, ifindex)
            for item in armed.values():
                self._disarm(item)
            kernel.close()
            with self._known_lock:
                self._frames_wake = None
            for fd in wake:
                os.close(fd)

    def _arm_watched(self, frames, armed, tried, kernel):
        """Each watched domain's resume planned ahead (engine.arm_record), again when its record changed;
        disarmed when its ports are no longer watched."""
        watched = {(w.driver, w.name) for w, _ in frames.watching.values()}
        store = self.store()
        for key in list(armed):
            if key not in watched:
                self._disarm(armed.pop(key))
            elif store.stamp(*key) != armed[key].stamp:  # its record changed (a started hook): plan again
                self._disarm(armed.pop(key))
                tried.discard(key)
        tried &= watched
        for key in sorted(watched - tried):
            tried.add(key)
            try:
                item = engine.arm_record(key[0], key[1], kernel, store)
            except (FdbhookError, OSError) as exc:  # the first frame takes the whole path
                LOG.warning("%s/%s: planning its resume ahead failed: %s", key[0], key[1], exc)
                continue
            if item is not None:
                armed[key] = item
                LOG.info("%s/%s: resume planned ahead, its intent written: its first frame leaves only the kernel "
                         "writes", key[0], key[1])

    def _disarm(self, item):
        try:
            engine.disarm(item)
        except (FdbhookError, OSError) as exc:  # the next recovery drops it (no longer armed)
            LOG.warning("%s/%s: dropping its planned resume: %s", item.driver, item.name, exc)

    def _frames_arrived(self, frames, socks, poller, fds, kernel, woken, armed=None):
        """Sockets ``fds`` are readable: a guest's first frame (its domain's entries in), or a port gone.
        ``woken``: (monotonic, wall-clock) times the poll returned."""
        by_fd = {sock.fileno(): sock for sock in socks.values()}
        for fd in fds:
            sock = by_fd.get(fd)
            if sock is None or sock.ifindex not in socks:  # closed in this round
                continue
            try:
                arrived = sock.drain()
            except OSError:  # the port went away (an aborted migration): nothing to do
                frames.dropped(sock.ifindex)
                self._close_frame_socket(socks, poller, sock.ifindex)
                continue
            if not arrived:
                continue
            watch, closing = frames.fired(sock.ifindex)
            done = [socks.pop(w.ifindex) for w in closing if w.ifindex in socks]
            for closed in done:
                poller.unregister(closed)
            if watch is not None:
                self._first_frame(kernel, watch, _received(woken, sock.received),
                                  (armed or {}).pop((watch.driver, watch.name), None))
            for closed in done:  # only now: closing a packet socket waits for an RCU grace period (ms)
                closed.close()

    def _update_frame_sockets(self, frames, socks, poller):
        """Open a socket on every port newly wanted, close those no longer wanted (or watched too long)."""
        with self._known_lock:
            want = self._frames_want
        to_open, to_close = frames.update(want, time.monotonic())
        for watch in to_close:
            self._close_frame_socket(socks, poller, watch.ifindex)
        for watch in to_open:
            try:
                sock = socks[watch.ifindex] = FrameSocket(watch.ifindex, firstframe.bpf_program(watch.macs))
            except (OSError, ValueError) as exc:  # the port is gone already; RESUMED still works
                LOG.warning("%s/%s: cannot watch %s for the guest's first frame: %s",
                            watch.driver, watch.name, watch.port, exc)
                frames.dropped(watch.ifindex)
                continue
            poller.register(sock, select.POLLIN)
            LOG.debug("%s/%s: watching %s for a frame from %s", watch.driver, watch.name, watch.port,
                      " ".join(watch.macs))

    @staticmethod
    def _close_frame_socket(socks, poller, ifindex):
        sock = socks.pop(ifindex, None)
        if sock is not None:
            poller.unregister(sock)
            sock.close()

    def _first_frame(self, kernel, watch, arrived=None, armed=None):
        """The incoming guest sent its first frame on ``watch.port``: its entries in, as RESUMED does (the
        plan ``armed`` ahead if it still holds: only the kernel writes are left). ``arrived``: (monotonic
        time the port received the frame, ms from then until the poll returned)."""
        arrived_at, woke_ms = (time.monotonic(), 0.0) if arrived is None else arrived
        with self._pause_lock:  # a RESUMED (or SUSPENDED after it) already handled: nothing left to do
            report, marks = None, {}
            if armed is not None:
                # As few syscalls as may be before the kernel write (each one hands the GIL over): the
                # store of the arming, no incoming mark check (what clears it also rewrites the record,
                # which fire_armed's stamp check sees).
                try:
                    report = engine.fire_armed(armed, kernel, marks)
                except (FdbhookError, OSError) as exc:  # RESUMED tries again
                    LOG.warning("%s/%s: first frame on %s: %s", watch.driver, watch.name, watch.port, exc)
                    return
            if report is not None:
                LOG.debug("%s/%s: first frame: woken after %.2f ms, store lock after %.2f ms, checked after %.2f "
                          "ms, kernel written after %.2f ms", watch.driver, watch.name, woke_ms,
                          *((marks[k] - arrived_at) * 1000 for k in ("locked", "checked", "written")))
                self._first_frame_done(armed.store, watch, arrived_at, report, "planned ahead, kernel written "
                                       "after %.1f ms" % ((marks["written"] - arrived_at) * 1000))
                return
            config = self.config()
            store = self.store(config)
            record = store.load(watch.driver, watch.name)
            if record is None or not record.paused or not store.is_incoming(watch.driver, watch.name):
                job = self._last_pause.get((watch.driver, watch.name))
                late = (arrived_at - job) * 1000 if job is not None else None
                LOG.info("%s/%s: first frame of the incoming guest on %s came %s: nothing left to do",
                         watch.driver, watch.name, watch.port, "%.1f ms after the RESUMED job started" % late
                         if late is not None and abs(late) < 10000 else "after RESUMED")
                return
            try:
                report = engine.reapply_record(watch.driver, watch.name, kernel, store, config, paused=False)
            except (FdbhookError, OSError) as exc:  # RESUMED tries again
                LOG.warning("%s/%s: first frame on %s: %s", watch.driver, watch.name, watch.port, exc)
                return
            self._first_frame_done(store, watch, arrived_at, report, "planned now")

    def _first_frame_done(self, store, watch, arrived_at, report, how):
        store.clear_incoming(watch.driver, watch.name)
        took = (time.monotonic() - arrived_at) * 1000
        self.first_frames += 1
        if self.metrics is not None:
            self.metrics.first_frame()
        LOG.info("%s/%s: first frame of the incoming guest on %s: entries in before RESUMED, %.1f ms after the frame"
                 " (%s; %s)", watch.driver, watch.name, watch.port, took,
                 ", ".join("%s %s" % (r.decision.port or "-", r.status) for r in report.results) or "no NIC", how)
        self.note_ports_changed()

    def _resync_timer(self):
        while not self.stopping.wait(self.config().resync_interval):
            self.put(Resync())
            for uri in list(self.watchers):
                self.put(Sync(uri))


def _realtime(what):
    """This thread (only) at SCHED_FIFO FRAMES_RTPRIO, when allowed: a frame it waits for wakes it ahead
    of QEMU's threads. Refused (no CAP_SYS_NICE, no RLIMIT_RTPRIO, RestrictRealtime=): it stays at the
    process's nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FRAMES_RTPRIO))
    except OSError as exc:
        LOG.debug("%s thread: no realtime priority (%s): at the process's nice", what, exc.strerror or exc)
        return False
    LOG.debug("%s thread: SCHED_FIFO %d", what, FRAMES_RTPRIO)
    return True


def _received(woken, received):
    """(monotonic time a frame reached its port, ms from then until the poll returned) from the poll's
    (monotonic, wall-clock) times and the kernel's timestamp of the frame (wall clock; None: not given).
    A stamp not within a second before the wake-up (no stamp, the clock stepped) counts as the wake-up."""
    mono, wall = woken
    lag = wall - received if received is not None else -1.0
    lag = lag if 0.0 <= lag < 1.0 else 0.0
    return mono - lag, lag * 1000


def _drain_pipe(fd):
    while True:
        try:
            if not os.read(fd, 4096):
                return
        except BlockingIOError:
            return


def _is_join(masters, event, ifindex, master):
    """Does this link event put the port on a master it was not on? Keeps ``masters`` (port ifindex ->
    master as last seen) up to date. A flag change of a port already on its bridge (our own apply, a
    teardown putting it back) is no join."""
    before = masters.pop(ifindex, None) if event == "del" else masters.get(ifindex)
    if event == "new":
        masters[ifindex] = master or None
    return event == "new" and bool(master) and master != before


def sd_notify(message):
    """Tell systemd (Type=notify) about our state: python3-systemd's ``systemd.daemon.notify``
    ($NOTIFY_SOCKET; False without it)."""
    try:
        from systemd import daemon as sd_daemon
    except ImportError as exc:
        LOG.warning("cannot notify systemd: %s (install python3-systemd)", exc)
        return False
    try:
        return bool(sd_daemon.notify(message))
    except Exception as exc:  # nothing about systemd may kill the daemon
        LOG.warning("cannot notify systemd: %s", exc)
        return False


def with_guest_mac(domain, alias, mac):
    """The domain with NIC ``alias`` using ``mac`` (from NIC_MAC_CHANGE), if its XML does not say so yet."""
    mac = normalize_mac(mac)
    nics = []
    for nic in domain.nics:
        if nic.alias == alias and mac and nic.mac != mac:
            nic = replace(nic, mac=mac, config_mac=nic.config_mac or nic.mac)
        nics.append(nic)
    return replace(domain, nics=tuple(nics))
