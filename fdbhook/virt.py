"""libvirt behind one module: connections, events, live XML, version facts.

The only module that imports libvirt-python. Used by fdbhookd, the CLI
(``apply DOMAIN``) and ``status``; never on a path that serves a hook
(libvirtd is blocked on that very hook). Event handling follows
libvirt-python's examples/event-test.py: the default event implementation is
registered before any connection opens and runs in its own thread; a close
callback plus keepalive notice a libvirtd restart; the watcher reconnects.
"""

import glob
import logging
import threading

from fdbhook.errors import LibvirtError

LOG = logging.getLogger(__name__)

# Where Debian (and most distributions) install libvirt's connection drivers.
DRIVER_GLOBS = ("/usr/lib/*/libvirt/connection-driver/libvirt_driver_%s.so",
                "/usr/lib64/libvirt/connection-driver/libvirt_driver_%s.so",
                "/usr/lib/libvirt/connection-driver/libvirt_driver_%s.so")


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise LibvirtError(reason="libvirt-python is not installed") from None
    # libvirt prints every error to stderr by default; ours is the one line.
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    return libvirt


def driver_of(uri):
    return "lxc" if uri.startswith("lxc") else "qemu"


def driver_installed(uri):
    """Is the connection driver for ``uri`` on this host? (no driver: do not even try)."""
    name = driver_of(uri)
    return any(glob.glob(pattern % name) for pattern in DRIVER_GLOBS)


def version_facts():
    """libvirt-python's version and whether it can report guest MAC changes."""
    try:
        libvirt = _libvirt()
    except LibvirtError:
        return {"libvirt_python": None, "nic_mac_change_event": False}
    version = libvirt.getVersion()
    return {
        "libvirt_python": ".".join(str(version // 10 ** (3 * i) % 1000) for i in (2, 1, 0)),
        "nic_mac_change_event": hasattr(libvirt, "VIR_DOMAIN_EVENT_ID_NIC_MAC_CHANGE"),
    }


def domain_xml(uri, name):
    """The live (or inactive) XML of one domain, as bytes; LibvirtError naming it."""
    libvirt = _libvirt()
    try:
        conn = libvirt.openReadOnly(uri)
        try:
            return conn.lookupByName(name).XMLDesc(0).encode()
        finally:
            conn.close()
    except libvirt.libvirtError as exc:
        raise LibvirtError(reason="%s: %s" % (name, exc.get_error_message())) from None


def start_event_loop(stopping):
    """Register the default event implementation and run it in a thread. False without libvirt-python."""
    try:
        libvirt = _libvirt()
    except LibvirtError:
        return False
    libvirt.virEventRegisterDefaultImpl()  # before any connection opens

    def loop():
        while not stopping.is_set():
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, name="libvirt-events", daemon=True).start()
    return True


class Watcher:
    """One libvirt URI: a read-only connection kept open, its events passed to ``handler``.

    ``handler`` has methods connected(uri), lifecycle(uri, name, event)
    with event in suspended/resumed/started, device_added(uri, name,
    alias), device_removed(uri, name, alias), mac_changed(uri, name, alias,
    old, new). Callbacks run on the event thread: they must only queue work.
    """

    def __init__(self, uri, handler, stopping):
        self.uri = uri
        self.driver = driver_of(uri)
        self.handler = handler
        self.stopping = stopping
        self.conn = None
        self.finished = threading.Event()
        self.kicked = threading.Event()  # another URI (re)connected: libvirtd may have restarted

    def run(self):
        """Connect, register, wait for the connection to close; again until stopping."""
        try:
            self._run()
        finally:
            self.finished.set()

    def _run(self):
        libvirt = _libvirt()
        delay = 1.0
        while not self.stopping.is_set():
            closed = threading.Event()
            conn = None
            try:
                conn = libvirt.openReadOnly(self.uri)
                conn.setKeepAlive(5, 3)
                conn.registerCloseCallback(lambda c, reason, opaque: closed.set(), None)
                ids = self._register(libvirt, conn)
            except libvirt.libvirtError as exc:
                if conn is not None:
                    _close(conn, ())
                if exc.get_error_code() == libvirt.VIR_ERR_NO_CONNECT:
                    # The running libvirtd has no such driver (installed
                    # after it started): every attempt would leave error
                    # lines in its log. Try again only after a restart.
                    LOG.info("libvirt %s: libvirtd has no driver for it; retrying after libvirtd restarts",
                             self.uri)
                    self._wait_kick()
                    continue
                LOG.debug("libvirt %s: %s; retrying", self.uri, exc.get_error_message())
                self.stopping.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            self.conn = conn
            LOG.info("libvirt %s: connected, %d event callbacks", self.uri, len(ids))
            self.handler.connected(self.uri)
            while not self.stopping.is_set() and not closed.wait(1.0):
                pass
            self.conn = None
            if not self.stopping.is_set():
                LOG.info("libvirt %s: connection closed; reconnecting", self.uri)
            _close(conn, ids)

    def _wait_kick(self):
        self.kicked.clear()
        while not self.stopping.is_set() and not self.kicked.wait(1.0):
            pass

    def kick(self):
        """Another connection to libvirtd was (re)established: worth trying this URI again."""
        self.kicked.set()

    def _register(self, libvirt, conn):
        uri, h = self.uri, self.handler
        kinds = {libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended", libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
                 libvirt.VIR_DOMAIN_EVENT_STARTED: "started"}

        def lifecycle(conn_, dom, event, detail, opaque):
            # STOPPED is the stopped/release hooks' job: a late event here
            # could tear down a guest that was started again meanwhile.
            if event in kinds:
                h.lifecycle(uri, dom.name(), kinds[event])

        ids = [conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None),
               conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                                           lambda c, dom, alias, o: h.device_added(uri, dom.name(), alias), None),
               conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                                           lambda c, dom, alias, o: h.device_removed(uri, dom.name(), alias), None)]
        mac_event = getattr(libvirt, "VIR_DOMAIN_EVENT_ID_NIC_MAC_CHANGE", None)
        if mac_event is not None:
            ids.append(conn.domainEventRegisterAny(
                None, mac_event, lambda c, dom, alias, old, new, o: h.mac_changed(uri, dom.name(), alias, old, new),
                None))
        return ids

    def live(self, name):
        """(XML bytes, state) of a running domain, or None. state: running | paused | starting.

        "starting" is a guest paused by libvirt itself on its way up (QEMU's
        ``-S`` before the first resume, an incoming migration): not a pause
        of the guest's to act on.
        """
        libvirt = _libvirt()
        conn = self.conn
        if conn is None:
            return None
        try:
            dom = conn.lookupByName(name)
            if not dom.isActive():
                return None
            state, reason = dom.state()
            xml = dom.XMLDesc(0).encode()
        except libvirt.libvirtError:
            return None
        if state == libvirt.VIR_DOMAIN_RUNNING:
            return xml, "running"
        starting = (getattr(libvirt, "VIR_DOMAIN_PAUSED_STARTING_UP", 11), libvirt.VIR_DOMAIN_PAUSED_MIGRATION)
        if state == libvirt.VIR_DOMAIN_PAUSED and reason in starting:
            return xml, "starting"
        return xml, "paused"

    def running(self):
        """Names of the running domains, or None if libvirt could not say."""
        libvirt = _libvirt()
        conn = self.conn
        if conn is None:
            return None
        try:
            return [dom.name() for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        except libvirt.libvirtError as exc:
            LOG.warning("libvirt %s: list domains failed: %s", self.uri, exc.get_error_message())
            return None

    def owner_of(self, port):
        """Name of the running domain whose XML names ``port`` as its target dev, or None."""
        return self.owners_of([port]).get(port)

    def owners_of(self, ports):
        """{port: name of the running domain whose XML names it as a target dev} for those found."""
        needles = {"dev='%s'" % port: port for port in ports}
        conn = self.conn
        if conn is None or not needles:
            return {}
        try:
            doms = conn.listAllDomains(1)  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
        except Exception:
            return {}
        out = {}
        for dom in doms:
            try:
                xml = dom.XMLDesc(0)
                for needle, port in needles.items():
                    if needle in xml:
                        out[port] = dom.name()
            except Exception:
                continue
        return out

    def close(self, timeout=5.0):
        """After ``stopping`` is set: wait until run() has closed its connection itself.

        Only a connection whose callbacks are all gone really closes; one
        left to the process exit makes libvirtd log "End of file while
        reading data" as an error.
        """
        if not self.finished.wait(timeout):
            LOG.warning("libvirt %s: connection not closed within %.0f s", self.uri, timeout)


def _close(conn, ids):
    """Deregister every callback (each holds a reference on the connection), then close."""
    for cb in ids:
        try:
            conn.domainEventDeregisterAny(cb)
        except Exception:
            pass
    try:
        conn.unregisterCloseCallback()
    except Exception:
        pass
    try:
        conn.close()
    except Exception:
        pass
