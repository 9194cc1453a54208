"""fdbhookd: what no hook sees, and the fast path for the hooks.

Threads, and what each may do:

* hook server (one thread per connection): serves hook invocations handed
  over by fdbhook.client through the same run_hook as the standalone hook.
  It never calls libvirt (libvirtd is blocked on that very hook) and never
  waits for the other threads; it shares only the store's file lock.
* libvirt (one per URI, after libvirt-python's examples/event-test.py): the
  default event implementation is registered before any connection opens and
  run in its own thread; callbacks only put jobs on the queue. Keepalive and
  a close callback detect a libvirtd restart; the thread reconnects and
  queues a full sync.
* kernel link monitor: a port joining a managed bridge that no record knows
  queues a lookup of its guest (hotplug within milliseconds of the join).
* worker: runs queued jobs one at a time: reconcile a domain from its live
  XML, pause/resume its entries, full sync, drift repair. It calls libvirt
  but never while holding the store lock.
"""

import logging
import os
import queue
import select
import signal
import socket
import socketserver
import struct
import threading
import time

from fdbhook.hook import run_hook

LOG = logging.getLogger(__name__)

DEFAULT_URIS = ("qemu:///system", "lxc:///system")
STALE_RECORD_AGE = 30.0  # a record of a domain libvirt does not list, younger than this, may be mid-start


class _HookHandler(socketserver.StreamRequestHandler):
    def handle(self):
        from fdbhook.client import pack, unpack

        daemon = self.server.fdbhookd
        try:
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != 0:
                self._answer(pack, 2, "", "fdbhook: fdbhookd serves root only")
                return
            # The client shuts down its sending side: read to EOF, bounded.
            raw = self.rfile.read(16 * 1024 * 1024)
            driver, argv, data = unpack(raw, 3)
            driver = driver.decode()
            argv = argv.decode("utf-8", "surrogateescape").split("\0") if argv else []
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self._answer(pack, 2, "", "fdbhook: bad request to fdbhookd: %s" % exc)
            return
        if driver == "ping":  # `fdbhook status` asking whether we run: no hook, no capture
            self._answer(pack, 0, "", "")
            return
        started = time.monotonic()
        result = run_hook(driver, argv, data, config=daemon.config(), daemon=True)
        daemon.hooks_served += 1
        LOG.debug("served %s %s in %.1f ms -> %d", driver, " ".join(argv[:2]),
                  (time.monotonic() - started) * 1000, result.code)
        self._answer(pack, result.code, result.stdout, result.stderr)
        if driver in ("qemu", "lxc") and len(argv) > 1 and argv[1] in ("start", "started", "reconnect"):
            daemon.note_ports_changed()

    def _answer(self, pack, code, out, err):
        try:
            self.wfile.write(pack(str(code).encode(), out.encode(), err.encode()))
            self.wfile.flush()
            # The client reads to EOF: end the answer now, before any
            # bookkeeping this thread still does.
            self.request.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True


class Daemon:
    def __init__(self, config_path=None, socket_path=None, uris=DEFAULT_URIS, use_libvirt=True):
        from fdbhook.client import socket_path as default_socket

        self.config_path = config_path
        self.socket_path = socket_path or default_socket()
        self.uris = tuple(uris)
        self.use_libvirt = use_libvirt
        self.jobs = queue.Queue()
        self._pending = set()  # queued jobs, so a burst of events for one domain runs it once
        self._pending_lock = threading.Lock()
        self.stopping = threading.Event()
        self.hooks_served = 0
        self.repairs = 0
        self._known_ports = set()
        self._known_lock = threading.Lock()
        self._conns = {}  # uri -> libvirt connection
        self._server = None
        self._threads = []

    # --- shared helpers -------------------------------------------------------
    def put(self, job):
        """Queue a job unless the same one is already waiting."""
        with self._pending_lock:
            if job in self._pending:
                return
            self._pending.add(job)
        self.jobs.put(job)

    def config(self):
        from fdbhook.config import load_config
        return load_config(self.config_path)

    def store(self, config=None):
        from fdbhook.state import Store
        return Store((config or self.config()).state_dir)

    def note_ports_changed(self):
        """Refresh the set of ports that records know (used by the link monitor)."""
        ports = set()
        for record in self.store().all():
            for nic in record.nics:
                ports.add(nic.ifindex)
        with self._known_lock:
            self._known_ports = ports

    # --- lifecycle ------------------------------------------------------------
    def start(self):
        # Import the hook path's modules now, not inside the first hook.
        import fdbhook.domxml  # noqa: F401
        import fdbhook.engine  # noqa: F401
        import fdbhook.kernel  # noqa: F401
        import pyroute2  # noqa: F401

        self.note_ports_changed()
        self._start_server()
        self._spawn("worker", self._worker)
        self._spawn("links", self._link_monitor)
        if self.use_libvirt:
            try:
                import libvirt
            except ImportError:
                LOG.warning("libvirt-python missing: no hotplug/pause/resume/MAC events, hooks and drift repair only")
            else:
                libvirt.registerErrorHandler(lambda ctx, err: None, None)  # we log what matters
                libvirt.virEventRegisterDefaultImpl()  # before any connection opens
                self._spawn("libvirt-events", self._event_loop)
                for uri in self.uris:
                    self._spawn("libvirt %s" % uri, self._libvirt_connection, uri)
        self._spawn("resync", self._resync_timer)
        self.put(("resync",))
        LOG.info("fdbhookd running: socket %s, libvirt %s", self.socket_path,
                 " ".join(self.uris) if self.use_libvirt else "off")

    def _spawn(self, name, target, *args):
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self):
        self.stopping.set()
        self.jobs.put(("stop",))  # bypasses dedupe: always delivered
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        for conn in list(self._conns.values()):
            try:
                conn.close()
            except Exception:
                pass

    def run_forever(self):
        signal.signal(signal.SIGTERM, lambda *a: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *a: self.stopping.set())
        self.start()
        while not self.stopping.wait(1.0):
            pass
        LOG.info("fdbhookd stopping")
        self.stop()
        return 0

    # --- hook server -----------------------------------------------------------
    def _start_server(self):
        directory = os.path.dirname(self.socket_path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
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

    # --- worker ----------------------------------------------------------------
    def _worker(self):
        from fdbhook.kernel import Kernel

        kernel = Kernel()
        while not self.stopping.is_set():
            job = self.jobs.get()
            if job[0] == "stop":
                break
            with self._pending_lock:
                self._pending.discard(job)
            try:
                self._run_job(kernel, job)
            except Exception:
                LOG.exception("job %s failed", job)
                kernel.close()
                kernel = Kernel()
        kernel.close()

    def _run_job(self, kernel, job):
        started = time.monotonic()
        try:
            self._do_job(kernel, job)
        finally:
            LOG.debug("job %s took %.1f ms (%d queued)", job, (time.monotonic() - started) * 1000,
                      self.jobs.qsize())

    def _do_job(self, kernel, job):
        from fdbhook import engine

        kind = job[0]
        config = self.config()
        store = self.store(config)
        if kind == "resync":
            started = time.monotonic()
            checked, repaired, failed = engine.resync(kernel, store, config)
            self.repairs += repaired
            LOG.log(logging.INFO if repaired or failed else logging.DEBUG,
                    "resync: %d ports checked, %d repaired, %d failed in %.0f ms",
                    checked, repaired, failed, (time.monotonic() - started) * 1000)
            self.note_ports_changed()
        elif kind == "sync":
            self._sync_all(kernel, store, config, job[1])
        elif kind == "reconcile":
            uri, name = job[1], job[2]
            self._reconcile(kernel, store, config, uri, name, alias=job[3] if len(job) > 3 else None)
        elif kind == "pause":
            _, driver, name, paused = job
            engine.reapply_record(driver, name, kernel, store, config, paused=paused)
            if not paused:
                store.clear_incoming(driver, name)
        elif kind == "port":
            self._find_port_owner(kernel, store, config, job[1])
        elif kind == "port-gone":
            for record in store.all():
                if any(nic.ifindex == job[1] for nic in record.nics):
                    engine.reapply_record(record.driver, record.domain, kernel, store, config)
            self.note_ports_changed()

    # --- libvirt ---------------------------------------------------------------
    @staticmethod
    def _driver(uri):
        return "lxc" if uri.startswith("lxc") else "qemu"

    def _event_loop(self):
        import libvirt

        while not self.stopping.is_set():
            libvirt.virEventRunDefaultImpl()

    def _libvirt_connection(self, uri):
        import libvirt

        delay = 1.0
        while not self.stopping.is_set():
            closed = threading.Event()
            try:
                conn = libvirt.openReadOnly(uri)
            except libvirt.libvirtError as exc:
                LOG.debug("libvirt %s: %s; retrying", uri, exc.get_error_message())
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            try:
                conn.setKeepAlive(5, 3)
                conn.registerCloseCallback(lambda c, reason, opaque: closed.set(), None)
                ids = self._register_events(conn, uri)
            except libvirt.libvirtError as exc:
                LOG.warning("libvirt %s: cannot register events: %s", uri, exc.get_error_message())
                conn.close()
                self.stopping.wait(delay)
                continue
            self._conns[uri] = conn
            LOG.info("libvirt %s: connected, %d event callbacks", uri, len(ids))
            self.put(("sync", uri))
            while not self.stopping.is_set() and not closed.wait(1.0):
                pass
            self._conns.pop(uri, None)
            if not self.stopping.is_set():
                LOG.info("libvirt %s: connection closed; reconnecting", uri)
            for cb in ids:
                try:
                    conn.domainEventDeregisterAny(cb)
                except Exception:
                    pass
            try:
                conn.close()
            except Exception:
                pass

    def _register_events(self, conn, uri):
        import libvirt

        driver = self._driver(uri)
        ids = []

        def lifecycle(conn_, dom, event, detail, opaque):
            name = dom.name()
            if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
                self.jobs.put(("pause", driver, name, True))  # order matters: never deduplicated
            elif event == libvirt.VIR_DOMAIN_EVENT_RESUMED:
                self.jobs.put(("pause", driver, name, False))
            elif event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                self.put(("reconcile", uri, name))
            # STOPPED is the stopped/release hooks' job: a late event here
            # could tear down a guest that was started again meanwhile.

        def added(conn_, dom, alias, opaque):
            self.put(("reconcile", uri, dom.name(), alias))

        def removed(conn_, dom, alias, opaque):
            self.put(("reconcile", uri, dom.name(), "-"))  # prune only

        ids.append(conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None))
        ids.append(conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, added, None))
        ids.append(conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, removed, None))
        mac_event = getattr(libvirt, "VIR_DOMAIN_EVENT_ID_NIC_MAC_CHANGE", None)
        if mac_event is not None:
            def mac_change(conn_, dom, alias, old, new, opaque):
                LOG.info("%s/%s: guest changed %s MAC %s -> %s", driver, dom.name(), alias, old, new)
                self.put(("reconcile", uri, dom.name()))
            ids.append(conn.domainEventRegisterAny(None, mac_event, mac_change, None))
        return ids

    def _live(self, uri, name, xml=None):
        """(domain model, paused) from libvirt's live XML, or (None, None)."""
        import libvirt

        from fdbhook.domxml import parse_domain

        conn = self._conns.get(uri)
        if conn is None:
            return None, None
        try:
            dom = conn.lookupByName(name)
            if not dom.isActive():
                return None, None
            state = dom.state()[0]
            xml = xml or dom.XMLDesc(0)
        except libvirt.libvirtError:
            return None, None
        paused = state not in (libvirt.VIR_DOMAIN_RUNNING,)
        return parse_domain(xml.encode(), driver=self._driver(uri), what=name), paused

    def _reconcile(self, kernel, store, config, uri, name, alias=None, port=None, xml=None):
        """Make a domain's ports match its live XML (hotplug, unplug, MAC change).

        With ``alias`` (a DEVICE_ADDED event) or ``port`` (a link event) only
        that NIC is applied: the cost of a hotplug must not grow with the
        number of NICs the guest already has.
        """
        from dataclasses import replace

        from fdbhook import engine

        domain, paused = self._live(uri, name, xml)
        if domain is None:
            return
        only = None
        if alias or port:
            only = {n.mac for n in domain.nics if (alias and n.alias == alias) or (port and n.target_dev == port)}
        if only is not None and not only:
            # Not a NIC (a disk, ...) or not in the XML yet: nothing to add;
            # an unplug still needs the record pruned below.
            apply_to = None
        else:
            apply_to = domain if only is None else replace(domain, nics=tuple(
                n for n in domain.nics if n.mac in only))
        if apply_to is not None:
            engine.apply_domain(apply_to, config, kernel, store, paused=paused, prune=only is None)
        record = store.load(domain.driver, name)
        if record is not None:
            macs = {nic.mac for nic in domain.nics}
            gone = {rec.mac for rec in record.nics} - macs
            if gone:
                engine.teardown_domain(domain.driver, name, kernel, store, macs=gone)
        self.note_ports_changed()

    def _sync_all(self, kernel, store, config, uri):
        """After (re)connecting: every running domain reconciled, stale records torn down."""
        import libvirt

        from fdbhook import engine

        conn = self._conns.get(uri)
        if conn is None:
            return
        driver = self._driver(uri)
        try:
            names = [dom.name() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        except libvirt.libvirtError as exc:
            LOG.warning("libvirt %s: list domains failed: %s", uri, exc.get_error_message())
            return
        for name in names:
            self._reconcile(kernel, store, config, uri, name)
        now = time.time()
        for record in store.all():
            if record.driver != driver or record.domain in names:
                continue
            newest = max((nic.applied for nic in record.nics), default=0.0)
            if now - newest > STALE_RECORD_AGE:
                LOG.info("%s/%s: not running any more; tearing down its record", driver, record.domain)
                engine.teardown_domain(driver, record.domain, kernel, store)
        self.note_ports_changed()

    def _find_port_owner(self, kernel, store, config, port):
        """A port joined a managed bridge: find its guest in libvirt and manage it."""
        needle = "dev='%s'" % port
        for uri, conn in list(self._conns.items()):
            try:
                doms = conn.listAllDomains(1)  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
            except Exception:
                continue
            for dom in doms:
                try:
                    xml = dom.XMLDesc(0)
                except Exception:
                    continue
                if needle in xml:
                    self._reconcile(kernel, store, config, uri, dom.name(), port=port, xml=xml)
                    return

    # --- kernel link monitor -----------------------------------------------------
    def _link_monitor(self):
        from fdbhook.kernel import Kernel, LinkMonitor

        monitor = LinkMonitor()
        kernel = Kernel()
        bridges = {}  # ifindex -> name
        asked = {}  # port ifindex -> when we last looked for its guest
        try:
            while not self.stopping.is_set():
                ready, _, _ = select.select([monitor], [], [], 1.0)
                if not ready:
                    continue
                events = monitor.read()
                with self._known_lock:
                    gone = [e[1] for e in events if e[0] == "del" and e[1] in self._known_ports]
                for ifindex in gone:
                    # A managed port vanished (unplug, even where libvirt sends
                    # no DEVICE_REMOVED, as for LXC): drop it from its record.
                    self.put(("port-gone", ifindex))
                events = [e for e in events if e[0] == "new" and e[3]]
                if not events:
                    continue
                config = self.config()
                for _, ifindex, port, master in events:
                    with self._known_lock:
                        if ifindex in self._known_ports:
                            continue
                    if master not in bridges:
                        link = kernel.by_index(master)
                        bridges[master] = link.name if link is not None and link.kind == "bridge" else None
                    name = bridges[master]
                    now = time.monotonic()
                    if name and port and (config.bridge_managed(name) or config.networks) \
                            and now - asked.get(ifindex, -60.0) > 5.0:
                        asked[ifindex] = now
                        self.put(("port", port))
        except Exception:
            LOG.exception("link monitor died")
        finally:
            monitor.close()
            kernel.close()

    # --- drift repair timer ------------------------------------------------------
    def _resync_timer(self):
        while not self.stopping.wait(self.config().resync_interval):
            self.put(("resync",))
            for uri in list(self._conns):
                self.put(("sync", uri))
