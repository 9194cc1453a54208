"""Under a real systemd (PID 1 of a booted Debian 12 container): the unit, the journal, the metrics.

One container for the module (booting costs a few seconds; the tests run in
file order on its state): install.sh from the repository, ``systemctl
enable --now fdbhookd``, libvirtd as Debian's unit, a diskless QEMU guest
(TCG) on a bridge created inside the container's own network namespace.
"""

import json
import os
import time

import pytest

from tests.systemd import nspawn

pytestmark = [pytest.mark.systemd, pytest.mark.root]

REQUIRED = os.environ.get("FDBHOOK_SYSTEMD_REQUIRED") == "1"
PROM = "/var/lib/prometheus/node-exporter/fdbhook.prom"
GUEST = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>
<devices><interface type='bridge'><source bridge='fdbsd0'/><mac address='{mac}'/>
<target dev='{dev}'/><model type='virtio'/><rom enabled='no'/></interface></devices></domain>"""
CONF = """[manage]
bridges = fdbsd*
[daemon]
resync_interval = 1
"""


def _unavailable(reason):
    if REQUIRED:
        pytest.fail("systemd tier set up by tests/run, yet: %s" % reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if os.environ.get("FDBHOOK_SKIP_SYSTEMD") == "1":
        pytest.skip("FDBHOOK_SKIP_SYSTEMD=1")
    missing = nspawn.missing_tools()
    if missing:
        _unavailable("missing %s (tests/run installs systemd-container and mmdebstrap)" % ", ".join(missing))
    try:
        with nspawn.booted() as container:
            _prepare(container)
            yield container
    except nspawn.Unavailable as exc:
        _unavailable(str(exc))


def _prepare(box):
    """libvirtd as configured on these machines, a bridge with an uplink, fdbhook installed and enabled."""
    box.sh("""set -e
        cat >>/etc/libvirt/qemu.conf <<'EOF'
user = "root"
group = "root"
cgroup_controllers = [ ]
security_driver = "none"
EOF
        ip link add fdbsd0 type bridge
        ip link add fdbsdup type veth peer name fdbsdup1
        ip link set fdbsdup master fdbsd0
        for l in fdbsd0 fdbsdup fdbsdup1; do ip link set $l up; done
        mkdir -p /var/lib/prometheus/node-exporter
        # Its stop waits 300 s for guests to shut down; these have no OS to do so.
        systemctl mask -q --now libvirt-guests.service""")
    # A snapshot of the repository: the live tree may change under a long run.
    box.sh("mkdir /root/src && tar -C /src --exclude=.git --exclude=__pycache__ -cf - . | tar -C /root/src -xf -")
    out = box.sh("/root/src/install.sh --venv --no-demo --bridges 'fdbsd*' --restart 2>&1")
    box.install_log = out.stdout
    box.sh("cat >/etc/fdbhook/fdbhook.conf", input=CONF)
    box.sh("systemctl enable --now fdbhookd.service 2>&1")


def _metrics(box):
    """{'name{labels}': value} from the textfile."""
    out = {}
    for line in box.sh("cat %s" % PROM).stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _journal(box, *matches):
    out = box.sh("journalctl --no-pager -o json %s" % " ".join(matches)).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _show(box, unit, *props):
    out = box.sh("systemctl show %s %s" % (unit, " ".join("-p " + p for p in props))).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _start_guest(box, name, mac, dev):
    box.sh("cat >/tmp/%s.xml && virsh -q define /tmp/%s.xml >/dev/null && virsh -q start %s"
           % (name, name, name), input=GUEST.format(name=name, mac=mac, dev=dev))


def test_install_puts_the_unit_the_man_page_and_the_completion_in_place_and_hints_enable(box):
    assert "installed /etc/systemd/system/fdbhookd.service" in box.install_log
    assert "systemctl enable --now fdbhookd" in box.install_log
    assert box.sh("man -w fdbhook").stdout.strip().endswith("/man8/fdbhook.8")
    assert "fdbhookd" in box.sh("MANPAGER=cat MANWIDTH=100 man fdbhook 2>/dev/null").stdout
    assert os.path.basename(box.sh("ls /usr/local/share/bash-completion/completions/fdbhook").stdout.strip()) \
        == "fdbhook"


def test_fdbhookd_is_type_notify_and_ready_with_its_socket(box):
    props = _show(box, "fdbhookd", "Type", "ActiveState", "SubState", "StatusText", "NRestarts", "MainPID")
    assert props["Type"] == "notify" and props["ActiveState"] == "active" and props["SubState"] == "running"
    assert props["StatusText"] == "serving hooks on /run/fdbhook/fdbhookd.sock"
    box.sh("test -S /run/fdbhook/fdbhookd.sock")


def test_hardening_leaves_only_net_admin_net_raw_and_unix_netlink_packet(box):
    props = _show(box, "fdbhookd", "CapabilityBoundingSet", "RestrictAddressFamilies", "ProtectSystem",
                  "ProtectHome", "NoNewPrivileges", "MainPID", "Nice")
    assert props["Nice"] == "-10"
    assert box.sh("cat /proc/%s/stat" % props["MainPID"]).stdout.rsplit(")", 1)[1].split()[16] == "-10"
    assert sorted(props["CapabilityBoundingSet"].split()) == ["cap_net_admin", "cap_net_raw"]
    assert sorted(props["RestrictAddressFamilies"].split()) == ["AF_NETLINK", "AF_PACKET", "AF_UNIX"]
    assert props["ProtectSystem"] == "strict" and props["ProtectHome"] == "yes" and props["NoNewPrivileges"] == "yes"
    status = box.sh("cat /proc/%s/status" % props["MainPID"]).stdout
    caps = {k: v.strip() for k, v in (line.split(":", 1) for line in status.splitlines() if line.startswith("Cap"))}
    assert int(caps["CapBnd"], 16) == 1 << 12 | 1 << 13  # CAP_NET_ADMIN and CAP_NET_RAW only
    # what those two are for beside netlink: the first-frame watch of incoming migrations can open its sockets
    status = json.loads(box.sh("fdbhook status --json").stdout)
    assert status["daemon"]["answering"] and status["daemon"]["first_frames_unavailable"] == ""
    # realtime for one thread only: the first-frame watch at SCHED_FIFO 1, allowed by RLIMIT_RTPRIO 1 alone
    props = _show(box, "fdbhookd", "LimitRTPRIO", "RestrictRealtime", "MainPID")
    assert props["LimitRTPRIO"] == "1" and props["RestrictRealtime"] == "no"
    policies = [box.sh("cat %s" % stat, check=False).stdout.rsplit(")", 1)[-1].split()[37:39]
                for stat in box.sh("ls /proc/%s/task/*/stat" % props["MainPID"]).stdout.split()]
    limit = box.sh("grep 'Max realtime priority' /proc/%s/limits" % props["MainPID"]).stdout.split()[3:5]
    if limit == ["1", "1"]:  # systemd could give the limit (a host's PID 1 can)
        assert policies.count(["1", "1"]) == 1, policies  # (rt_priority, policy SCHED_FIFO): one thread
    else:
        # This machine's container: its PID 1 has RLIMIT_RTPRIO 0 and no CAP_SYS_RESOURCE to raise it, so
        # the limit stays 0: the thread is refused and stays at the nice; fdbhookd serves all the same.
        assert policies.count(["1", "1"]) == 0 and limit == ["0", "0"], (limit, policies)


def test_libvirtd_and_the_modular_daemons_start_after_fdbhookd(box):
    for unit in ("libvirtd", "virtqemud", "virtlxcd", "virtnetworkd"):
        after = _show(box, unit, "After", "LoadState")
        if after.get("LoadState") == "loaded":
            assert "fdbhookd.service" in after["After"].split(), unit
    assert "fdbhookd.service" in _show(box, "libvirtd", "After")["After"].split()
    # One transaction starting both: libvirtd's start begins only once fdbhookd said READY=1. Its
    # sockets go first: fdbhookd reconnecting while libvirtd stops would socket-activate it again.
    sockets = "libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket"
    box.sh("systemctl stop %s libvirtd.service fdbhookd.service" % sockets)
    assert box.sh("systemctl is-active libvirtd.service fdbhookd.service", check=False).stdout.split() \
        == ["inactive", "inactive"]
    # Both jobs in one transaction, as at boot (multi-user.target wants both): `systemctl start A B`
    # would queue two transactions, and the first can run before the second exists.
    box.sh("printf '[Unit]\\nWants=libvirtd.service fdbhookd.service\\n' >/run/systemd/system/fdbsd-both.target"
           " && systemctl daemon-reload && systemctl start fdbsd-both.target && systemctl start %s" % sockets)
    fdb = _show(box, "fdbhookd", "ActiveEnterTimestampMonotonic", "ExecMainStartTimestampMonotonic")
    lv = _show(box, "libvirtd", "ExecMainStartTimestampMonotonic", "ActiveState")
    assert lv["ActiveState"] == "active"
    ready, libvirtd_started = int(fdb["ActiveEnterTimestampMonotonic"]), int(lv["ExecMainStartTimestampMonotonic"])
    assert int(fdb["ExecMainStartTimestampMonotonic"]) < ready <= libvirtd_started, (fdb, lv)


def test_a_guest_start_is_served_by_fdbhookd(box):
    _start_guest(box, "web1", "52:54:00:5d:00:01", "fdbsdt1")
    fdb = json.loads(box.sh("bridge -j fdb show br fdbsd0").stdout)
    entry = [e for e in fdb if e.get("mac") == "52:54:00:5d:00:01"]
    assert entry and entry[0]["ifname"] == "fdbsdt1" and "static" in entry[0].get("state", "") + str(entry[0])
    port = json.loads(box.sh("ip -d -j link show fdbsdt1").stdout)[0]["linkinfo"]["info_slave_data"]
    assert port["learning"] is False and port["flood"] is False
    m = box.poll("grep -F 'fdbhook_hook_calls_total{driver=\"qemu\",operation=\"start\",outcome=\"ok\"}' %s"
                 % PROM).stdout
    assert float(m.split()[-1]) >= 1.0  # fdbhookd served the start hook, not the standalone fallback


def test_journal_has_the_per_nic_fields(box):
    lines = _journal(box, "FDBHOOK_DOMAIN=web1", "FDBHOOK_ACTION=apply", "FDBHOOK_RESULT=changed")
    assert lines, "journalctl FDBHOOK_DOMAIN=web1 found nothing"
    line = lines[0]
    # fdbhookd may manage the port as it joins the bridge, from the prepare
    # hook's XML, before libvirt has named the NIC (its alias): then no NIC field.
    assert line.get("FDBHOOK_NIC", "net0") == "net0" and line["FDBHOOK_MAC"] == "52:54:00:5d:00:01"
    assert line["FDBHOOK_PORT"] == "fdbsdt1" and line["FDBHOOK_BRIDGE"] == "fdbsd0"
    assert line["MESSAGE_ID"] == "6f0c1d2a9b3e4f5a8c7d6e5f4a3b2c10" and line["SYSLOG_IDENTIFIER"] == "fdbhook"
    assert line["_SYSTEMD_UNIT"] == "fdbhookd.service"
    assert line["MESSAGE"].startswith("qemu/web1: ") and " (52:54:00:5d:00:01) fdbsdt1 on fdbsd0: " in line["MESSAGE"]
    # Once, not also through stderr (JOURNAL_STREAM) or syslog.
    same = _journal(box, "_SYSTEMD_UNIT=fdbhookd.service")
    assert len([l for l in same if l.get("MESSAGE") == line["MESSAGE"]]) == 1
    assert int(box.sh("journalctl -q --no-pager MESSAGE_ID=%s | grep -c web1" % line["MESSAGE_ID"]).stdout) >= 1


def test_metrics_file_has_the_values(box):
    box.poll("grep -qx 'fdbhook_managed_ports{bridge=\"fdbsd0\"} 1.0' %s" % PROM)
    m = _metrics(box)
    assert m['fdbhook_fdb_entries{bridge="fdbsd0"}'] == 1.0
    assert 'fdbhook_uplink_promiscuity{bridge="fdbsd0",port="fdbsdup"}' in m
    assert m["fdbhook_managed_domains"] == 1.0
    assert m["fdbhook_last_resync_timestamp_seconds"] > time.time() - 3600
    assert m['fdbhook_hook_duration_seconds_count{driver="qemu",operation="start"}'] >= 1.0
    assert box.sh("stat -c %a " + PROM).stdout.strip() == "644"
    assert box.sh("ls -A /var/lib/prometheus/node-exporter").stdout.split() == ["fdbhook.prom"]


def test_drift_is_repaired_under_the_hardened_unit_and_counted(box):
    before = _metrics(box).get("fdbhook_drift_repaired_total", 0.0)
    box.sh("bridge link set dev fdbsdt1 learning on")
    box.poll("ip -d -j link show fdbsdt1 | grep -q '\"learning\":false'", timeout=15)
    box.poll("awk '$1 == \"fdbhook_drift_repaired_total\" && $2 > %s { ok = 1 } END { exit !ok }' %s"
             % (before, PROM), timeout=15)
    lines = _journal(box, "FDBHOOK_DOMAIN=web1", "FDBHOOK_ACTION=reapply")
    assert lines and lines[-1]["FDBHOOK_RESULT"] == "changed"


def test_without_fdbhookd_the_hooks_log_fields_to_the_journal_themselves(box):
    box.sh("systemctl stop fdbhookd.service")
    try:
        _start_guest(box, "web2", "52:54:00:5d:00:02", "fdbsdt2")
        lines = _journal(box, "FDBHOOK_DOMAIN=web2", "FDBHOOK_RESULT=changed")
        assert lines and lines[0]["_SYSTEMD_UNIT"] == "libvirtd.service"  # the hook process, run by libvirtd
        assert lines[0]["FDBHOOK_PORT"] == "fdbsdt2"
    finally:
        box.sh("virsh -q destroy web2 >/dev/null; systemctl start fdbhookd.service")


def test_bash_completion_names_subcommands_and_domains(box):
    script = ("source /usr/share/bash-completion/bash_completion; "
              "source /usr/local/share/bash-completion/completions/fdbhook; "
              "COMP_WORDS=(fdbhook %s); COMP_CWORD=%d; _fdbhook; echo ${COMPREPLY[@]}")
    assert "status" in box.sh(script % ("st", 1)).stdout.split()
    assert sorted(box.sh(script % ("apply we", 2)).stdout.split()) == ["web1", "web2"]


def test_install_again_restarts_fdbhookd_only_when_its_code_changed(box):
    pid = _show(box, "fdbhookd", "MainPID")["MainPID"]
    out = box.sh("/root/src/install.sh --venv --no-demo 2>&1").stdout
    assert "restarting fdbhookd" not in out and _show(box, "fdbhookd", "MainPID")["MainPID"] == pid
    box.sh("rm -rf /root/src2 && cp -a /root/src /root/src2 && echo '# changed' >>/root/src2/fdbhook/metrics.py")
    out = box.sh("/root/src2/install.sh --venv --no-demo 2>&1").stdout
    assert "restarting fdbhookd.service (new code or unit)" in out
    box.poll("systemctl is-active -q fdbhookd.service")
    assert _show(box, "fdbhookd", "MainPID")["MainPID"] != pid


def test_uninstall_stops_and_removes_the_unit_and_docs(box):
    box.sh("virsh -q destroy web1 >/dev/null")
    box.poll("test ! -s /run/fdbhook/domains/qemu-web1.json", timeout=10)
    out = box.sh("/root/src/install.sh --venv --uninstall --force 2>&1").stdout
    assert "removed /etc/systemd/system/fdbhookd.service" in out
    assert box.sh("systemctl is-active fdbhookd.service", check=False).stdout.strip() in ("inactive", "unknown")
    box.sh("test ! -e /usr/local/share/man/man8/fdbhook.8 && "
           "test ! -e /usr/local/share/bash-completion/completions/fdbhook")
