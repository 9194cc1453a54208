"""fdbhookd's Prometheus metrics: node_exporter's textfile collector, and an optional local endpoint.

Counters and the hook latency histogram are updated where things happen
(the hook server, the worker); the gauges that describe the current state
(managed ports, entries, uplink promiscuity) are a snapshot computed from
our records and the kernel's links (``snapshot``, pure) and swapped in
whole, so a scrape never sees half of one. The text format is
prometheus_client's (Debian's python3-prometheus-client); it is imported
only by fdbhookd, never by a hook.

The textfile is written to a temporary file with a random name in the same
directory (fdbhook.safefile) and renamed over ``fdbhook.prom``: the collector reads only ``*.prom`` and never
half a file.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Tuple

from fdbhook.errors import log_failure

LOG = logging.getLogger(__name__)

PREFIX = "fdbhook"
# Hook calls served by fdbhookd take milliseconds; a slow one (a big domain,
# a busy bridge) tens of them; seconds means something is wrong.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
OUTCOMES = {0: "ok", 1: "failed", 2: "error"}


@dataclass(frozen=True)
class Snapshot:
    """The state gauges at one moment."""

    managed_ports: Dict[str, int] = field(default_factory=dict)  # bridge -> ports with a record
    entries: Dict[str, int] = field(default_factory=dict)  # bridge -> static entries we hold
    uplink_promiscuity: Dict[Tuple[str, str], int] = field(default_factory=dict)  # (bridge, port) -> count
    domains: int = 0


def snapshot(records, links, config):
    """Gauges from our records and the kernel's links (pure).

    A managed bridge is one the config names or one a record is on. Its
    uplinks are its ports that are not guest ports of a record; their
    IFLA_PROMISCUITY (0 = the kernel could take the uplink out of
    promiscuous mode) is what the admin watches. Entries of a paused guest
    are out of the FDB, so they do not count.
    """
    ports, entries = {}, {}
    guest_ports = set()
    for record in records:
        for rec in record.nics:
            guest_ports.add(rec.ifindex)
            ports[rec.bridge] = ports.get(rec.bridge, 0) + 1
            entries[rec.bridge] = entries.get(rec.bridge, 0) + (0 if record.paused else len(rec.keys))
    bridges = {link.ifindex: link.name for link in links
               if link.kind == "bridge" and (link.name in ports or config.bridge_managed(link.name))}
    for name in bridges.values():
        ports.setdefault(name, 0)
        entries.setdefault(name, 0)
    promisc = {}
    for link in links:
        if link.master in bridges and link.ifindex not in guest_ports and link.is_bridge_port:
            promisc[(bridges[link.master], link.name)] = int(link.promiscuity or 0)
    return Snapshot(managed_ports=ports, entries=entries, uplink_promiscuity=promisc, domains=len(records))


class _StateCollector:
    """Yields the gauges of the current Snapshot (prometheus_client custom collector)."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        snap, resync = self.metrics.state()
        g = GaugeMetricFamily(PREFIX + "_managed_ports", "Guest ports fdbhook manages, per bridge",
                              labels=["bridge"])
        for bridge, value in sorted(snap.managed_ports.items()):
            g.add_metric([bridge], value)
        yield g
        g = GaugeMetricFamily(PREFIX + "_fdb_entries", "Static FDB entries fdbhook holds, per bridge",
                              labels=["bridge"])
        for bridge, value in sorted(snap.entries.items()):
            g.add_metric([bridge], value)
        yield g
        g = GaugeMetricFamily(PREFIX + "_uplink_promiscuity",
                              "IFLA_PROMISCUITY of each non-guest port of a managed bridge (0: not promiscuous)",
                              labels=["bridge", "port"])
        for (bridge, port), value in sorted(snap.uplink_promiscuity.items()):
            g.add_metric([bridge, port], value)
        yield g
        yield GaugeMetricFamily(PREFIX + "_managed_domains", "Domains with a record", value=snap.domains)
        yield GaugeMetricFamily(PREFIX + "_last_resync_timestamp_seconds",
                                "Unix time the last full resync finished (0: none yet)", value=resync)


class Metrics:
    """fdbhookd's metrics. Thread-safe; every method is cheap and never raises."""

    def __init__(self):
        # No *_created series (a timestamp per counter): noise in a textfile
        # that node_exporter re-reads. The library reads this at import.
        os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "true")
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.hooks = Counter(PREFIX + "_hook_calls", "Hook calls served by fdbhookd",
                             ["driver", "operation", "outcome"], registry=self.registry)
        self.latency = Histogram(PREFIX + "_hook_duration_seconds", "Time fdbhookd took to serve a hook call",
                                 ["driver", "operation"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.drift_found = Counter(PREFIX + "_drift_found", "Managed ports found drifted by a resync",
                                   registry=self.registry)
        self.drift_repaired = Counter(PREFIX + "_drift_repaired", "Drifted ports a resync repaired",
                                      registry=self.registry)
        self.mac_changes = Counter(PREFIX + "_mac_changes", "Guest MAC changes (NIC_MAC_CHANGE) followed",
                                   registry=self.registry)
        self.resyncs = Counter(PREFIX + "_resyncs", "Full resyncs run", registry=self.registry)
        self.first_frames = Counter(PREFIX + "_incoming_first_frames",
                                    "Incoming migrations whose entries went in at the guest's first frame",
                                    registry=self.registry)
        self._lock = threading.Lock()
        self._snapshot = Snapshot()
        self._last_resync = 0.0
        self.registry.register(_StateCollector(self))

    def state(self):
        with self._lock:
            return self._snapshot, self._last_resync

    def hook_served(self, driver, argv, code, seconds):
        op = argv[1] if len(argv) > 1 else "-"
        self.hooks.labels(driver, op, OUTCOMES.get(code, "error")).inc()
        self.latency.labels(driver, op).observe(seconds)

    def resync_done(self, checked, repaired, failed, now=None):
        self.drift_found.inc(repaired + failed)
        self.drift_repaired.inc(repaired)
        self.resyncs.inc()
        with self._lock:
            self._last_resync = time.time() if now is None else now

    def mac_changed(self):
        self.mac_changes.inc()

    def first_frame(self):
        self.first_frames.inc()

    def refresh(self, records, links, config):
        snap = snapshot(records, links, config)
        with self._lock:
            self._snapshot = snap

    def text(self):
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def write_textfile(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    fdbhook.safefile: an O_EXCL temp file with a random name, no symlink
    followed anywhere on the path, mode 0644 from creation. The directory
    may belong to node_exporter's user (only renamed into, never trusted).
    """
    from fdbhook import safefile

    safefile.write_file(path, data, mode=0o644, create=False, trusted=False, fsync=False)


class Exporter:
    """The thread that keeps the textfile (and the optional endpoint) current.

    ``touch()`` asks for a refresh soon (a hook served, a job run); without
    one the file is rewritten every ``interval`` seconds anyway, so its
    mtime says fdbhookd is alive. At most one write per ``min_gap`` seconds.
    """

    def __init__(self, metrics, config_source, read_state, stopping, interval=15.0, min_gap=1.0):
        self.metrics = metrics
        self.config_source = config_source  # () -> Config
        self.read_state = read_state  # (kernel) -> (records, links)
        self.stopping = stopping
        self.interval = interval
        self.min_gap = min_gap
        self._wake = threading.Event()
        self._complained = set()
        self.http = None

    def touch(self):
        self._wake.set()

    def start_http(self, listen):
        """The optional endpoint (``[metrics] listen``); errors are logged, never fatal."""
        from prometheus_client import start_http_server

        from fdbhook.config import parse_listen

        try:
            host, port = parse_listen(listen)
            start_http_server(port, addr=host, registry=self.metrics.registry)
        except (OSError, ValueError) as exc:
            LOG.error("metrics: cannot listen on %s: %s (under fdbhookd.service an IP endpoint also needs "
                      "RestrictAddressFamilies=AF_INET AF_INET6 in a drop-in)", listen, exc)
            return False
        LOG.info("metrics: serving http://%s/metrics", listen)
        self.http = listen
        return True

    def run(self):
        from fdbhook.kernel import Kernel

        kernel = None
        while not self.stopping.is_set():
            try:
                kernel = kernel or Kernel()
                self.write_once(kernel)
            except Exception as exc:
                log_failure(LOG, exc, "metrics: refresh failed")
                if kernel is not None:
                    kernel.close()
                kernel = None
            self._wake.wait(self.interval)
            self._wake.clear()
            self.stopping.wait(self.min_gap)
        if kernel is not None:
            kernel.close()

    def write_once(self, kernel):
        config = self.config_source()
        records, links = self.read_state(kernel)
        self.metrics.refresh(records, links, config)
        path = config.metrics_textfile
        if not path:
            return
        try:
            write_textfile(path, self.metrics.text())
        except OSError as exc:
            if path not in self._complained:  # once, not every interval
                self._complained.add(path)
                LOG.warning("metrics: cannot write %s: %s", path, exc.strerror or exc)
            return
        self._complained.discard(path)
