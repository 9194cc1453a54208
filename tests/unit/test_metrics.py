"""fdbhookd's metrics: the state snapshot, the text format, the textfile, [metrics] config, sd_notify."""

import os
import socket
import threading

import pytest

from fdbhook import daemon as D
from fdbhook import domxml
from fdbhook.config import parse_config
from fdbhook.engine import apply_domain
from fdbhook.errors import ConfigError
from fdbhook.metrics import Exporter, Metrics, snapshot, write_textfile
from fdbhook.model import Link
from fdbhook.state import Store
from tests.fakes import FakeKernel
from tests.helpers import bridge_nic, config, domain_xml

pytest.importorskip("prometheus_client")


def managed(tmp_path):
    kernel = FakeKernel.bridge_with_ports("br0", ("vnet0", "vnet1", "eth0"))
    store = Store(str(tmp_path / "state"))
    xml = domain_xml([bridge_nic(), bridge_nic(mac="52:54:00:00:00:02", dev="vnet1", alias="net1")], name="web1")
    apply_domain(domxml.parse_domain(xml), config(), kernel, store)
    return kernel, store


def samples(metrics):
    """{(name, labels tuple): value} of everything exported."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_snapshot_counts_ports_entries_and_uplink_promiscuity(tmp_path):
    kernel, store = managed(tmp_path)
    links = [l if l.name != "eth0" else Link(**{**l.__dict__, "promiscuity": 1}) for l in kernel.links()]
    links.append(Link(name="br9", ifindex=99, kind="bridge"))  # not managed, no record: not reported
    snap = snapshot(store.all(), links, config())
    assert snap.managed_ports == {"br0": 2} and snap.entries == {"br0": 2}
    assert snap.uplink_promiscuity == {("br0", "eth0"): 1}  # guest ports are not uplinks
    assert snap.domains == 1


def test_a_paused_guest_holds_no_entries_and_a_managed_bridge_without_guests_reports_zero(tmp_path):
    kernel, store = managed(tmp_path)
    from dataclasses import replace
    store.save(replace(store.load("qemu", "web1"), paused=True))
    cfg = parse_config("[manage]\nbridges = br*\n")
    links = kernel.links() + [Link(name="br1", ifindex=50, kind="bridge"),
                              Link(name="up1", ifindex=51, kind="veth", master=50, is_bridge_port=True)]
    snap = snapshot(store.all(), links, cfg)
    assert snap.managed_ports == {"br0": 2, "br1": 0} and snap.entries == {"br0": 0, "br1": 0}
    assert snap.uplink_promiscuity == {("br0", "eth0"): 0, ("br1", "up1"): 0}


def test_text_has_every_metric_of_the_issue_with_units_in_the_names(tmp_path):
    kernel, store = managed(tmp_path)
    m = Metrics()
    m.refresh(store.all(), kernel.links(), config())
    m.hook_served("qemu", ["web1", "start", "begin", "-"], 0, 0.004)
    m.hook_served("qemu", ["web1", "start", "begin", "-"], 1, 0.02)
    m.hook_served("qemu", ["web1", "prepare", "begin", "-"], 0, 0.0005)
    m.resync_done(10, 2, 1, now=1700000000.0)
    m.mac_changed()
    got = samples(m)
    assert got[("fdbhook_managed_ports", (("bridge", "br0"),))] == 2
    assert got[("fdbhook_fdb_entries", (("bridge", "br0"),))] == 2
    assert got[("fdbhook_uplink_promiscuity", (("bridge", "br0"), ("port", "eth0")))] == 0
    key = (("driver", "qemu"), ("operation", "start"), ("outcome", "ok"))
    assert got[("fdbhook_hook_calls_total", key)] == 1
    assert got[("fdbhook_hook_calls_total", key[:2] + (("outcome", "failed"),))] == 1
    assert got[("fdbhook_hook_duration_seconds_count", (("driver", "qemu"), ("operation", "start")))] == 2
    assert got[("fdbhook_hook_duration_seconds_bucket",
                (("driver", "qemu"), ("le", "0.005"), ("operation", "start")))] == 1
    assert got[("fdbhook_drift_found_total", ())] == 3
    assert got[("fdbhook_drift_repaired_total", ())] == 2
    assert got[("fdbhook_mac_changes_total", ())] == 1
    assert got[("fdbhook_last_resync_timestamp_seconds", ())] == 1700000000.0
    assert got[("fdbhook_managed_domains", ())] == 1


def test_a_bridge_that_goes_away_leaves_the_gauges(tmp_path):
    kernel, store = managed(tmp_path)
    m = Metrics()
    m.refresh(store.all(), kernel.links(), config())
    m.refresh([], [], config())
    assert not [k for k in samples(m) if k[0] == "fdbhook_managed_ports"]


def test_textfile_is_replaced_by_rename_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "fdbhook.prom"
    path.write_text("old\n")
    inode = path.stat().st_ino
    write_textfile(str(path), b"new 1\n")
    assert path.read_text() == "new 1\n" and path.stat().st_ino != inode
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(tmp_path)) == ["fdbhook.prom"]


def test_exporter_writes_the_configured_file_and_complains_once_when_it_cannot(tmp_path):
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("fdbhook.metrics").addHandler(handler)
    kernel, store = managed(tmp_path)
    prom = tmp_path / "node-exporter" / "fdbhook.prom"
    cfg = parse_config("[manage]\nbridges = br0\n[metrics]\ntextfile = %s\n" % prom)
    exporter = Exporter(Metrics(), lambda: cfg, lambda k: (store.all(), k.links()), threading.Event())
    try:
        exporter.write_once(kernel)
        exporter.write_once(kernel)
    finally:
        logging.getLogger("fdbhook.metrics").removeHandler(handler)
    assert len([r for r in seen if "cannot write" in r.getMessage()]) == 1
    prom.parent.mkdir()
    exporter.write_once(kernel)
    assert 'fdbhook_managed_ports{bridge="br0"} 2.0' in prom.read_text()


def test_metrics_config_keys():
    cfg = parse_config("[manage]\nbridges = br0\n")
    assert cfg.metrics_textfile == "/var/lib/prometheus/node-exporter/fdbhook.prom" and cfg.metrics_listen == ""
    cfg = parse_config("[metrics]\ntextfile =\nlisten = 127.0.0.1:9311\n")
    assert cfg.metrics_textfile == "" and cfg.metrics_listen == "127.0.0.1:9311"
    for bad in ("textfile = relative.prom", "textfile = /x/fdbhook.txt", "listen = 9311", "listen = h:99999",
                "port = 1"):
        with pytest.raises(ConfigError):
            parse_config("[metrics]\n%s\n" % bad)


def test_daemon_counts_the_hooks_it_serves(tmp_path):
    conf = tmp_path / "fdbhook.conf"
    conf.write_text("[manage]\nbridges = br0\n[metrics]\ntextfile =\n")
    d = D.Daemon(config_path=str(conf), socket_path=str(tmp_path / "sock"), use_libvirt=False)
    d.metrics = Metrics()
    d.exporter = Exporter(d.metrics, d.config, lambda k: ([], []), d.stopping)
    d.kernels.take = lambda: FakeKernel.bridge_with_ports()
    d.kernels.give = lambda kernel, broken=False: None
    d.serve_hook("qemu", ["web1", "prepare", "begin", "-"], b"<domain/>")
    got = samples(d.metrics)
    assert got[("fdbhook_hook_calls_total",
                (("driver", "qemu"), ("operation", "prepare"), ("outcome", "ok")))] == 1


def test_sd_notify_sends_one_datagram_to_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert D.sd_notify("READY=1")
        assert sock.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not D.sd_notify("READY=1")
