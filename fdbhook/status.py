"""What is managed, is it still right, and why is the uplink still promiscuous.

``collect`` reads the kernel and our records into plain dicts (the JSON of
``fdbhook status --json``); ``explain_bridge`` is a pure function that turns
one bridge's dict into sentences.
"""

import json
import os

from fdbhook import lockdown
from fdbhook.current import read_port
from fdbhook.engine import desired_from_record
from fdbhook.errors import StateError
from fdbhook.plan import drift
from fdbhook.resolve import load_networks

# Port device kinds that have no IFF_UNICAST_FLT: the kernel must keep them
# promiscuous whatever the FDB says.
NO_UNICAST_FILTER = ("veth", "tun", "bridge")


def _vlan_filtering_supported(bridge):
    # With CONFIG_BRIDGE_VLAN_FILTERING=n the sysfs attribute does not exist.
    return os.path.exists("/sys/class/net/%s/bridge/vlan_filtering" % bridge)


def _port_dict(kernel, link, rec, owner, bridge_ifindex, paused=False):
    """One port for status/explain; for a managed port, drift = the plan of its record against the kernel."""
    port = {
        "name": link.name,
        "ifindex": link.ifindex,
        "kind": link.kind,
        "learning": bool(link.learning),
        "flood": bool(link.flood),
        "promiscuity": link.promiscuity,
        "domain": owner,
        "mac": rec.mac if rec else None,
        "static_entry": None,
        "drift": [],
    }
    if rec is not None:
        want = desired_from_record(rec, bridge_ifindex, paused, kernel.sticky_supported)
        have = read_port(kernel, want, link)
        port["drift"] = drift(want, have)
        port["static_entry"] = all(have.owns(key) for key in want.entries) if not paused else None
        port["sticky"] = any(entry is not None and entry.sticky for _, entry in have.entries)
        port["vlans"] = sorted({vid for _, vid in want.watch if vid})
        port["paused"] = paused
        if rec.config_mac:
            port["configured_mac"] = rec.config_mac
        port.update(_security_dict(kernel, link, rec))
    return port


def _security_dict(kernel, link, rec):
    """Extra and floating MACs, lock mode, and (MAB) the source MACs a locked port dropped."""
    out = {"extra_macs": list(rec.extra_macs), "floating_macs": list(rec.floating_macs),
           "locked": bool(link.locked), "lock_mode": rec.locked, "mab": bool(link.mab)}
    if link.locked and link.mab:
        # With MAB the bridge records each unknown source MAC it dropped as a
        # "locked" entry on the port (kernel >= 6.2): what the guest tried.
        out["dropped_macs"] = sorted({mac for mac, _ in kernel.locked_entries(link.ifindex)})
    return out


GUEST_MAC_WORDS = {
    "followed": "guest MAC change: followed (trustGuestRxFilters='yes': libvirt reports the guest's MAC, "
                "fdbhookd moves the entry)",
    "not trusted": "guest MAC change: NOT followed (trustGuestRxFilters='no'): if the guest sets another MAC "
                   "it gets no unicast for it (no entry, its port does not flood), and libvirt reports nothing "
                   "(no event, no log line, the live XML keeps the configured MAC)",
    "no event": "guest MAC change: NOT followed: this libvirt has no NIC_MAC_CHANGE event (needs >= 11.2); "
                "a guest that sets another MAC gets no unicast for it",
    "no daemon": "guest MAC change: reported by libvirt, but fdbhookd is not running: followed only at the "
                 "next start or reconnect; until then the guest gets no unicast for its new MAC",
}


def guest_mac_trust_of(driver, name):
    """{configured MAC: trustGuestRxFilters='yes'} from the running domain's XML, or None if unknown."""
    if driver != "qemu":
        return None  # libvirt reports guest MAC changes for QEMU NICs only
    try:
        from fdbhook.domxml import guest_mac_trust
        from fdbhook.virt import domain_xml
        return guest_mac_trust(domain_xml("qemu:///system", name), name)
    except Exception:  # libvirt absent or unreachable, domain gone: say nothing rather than guess
        return None


def _guest_mac_change(ports, daemon):
    """Per managed QEMU port: is a MAC the guest sets itself followed, and if not, why (one key of GUEST_MAC_WORDS)."""
    trust = {}
    for port in ports:
        if not port.get("domain"):
            continue
        driver, _, name = port["domain"].partition("/")
        if port["domain"] not in trust:
            trust[port["domain"]] = guest_mac_trust_of(driver, name)
        known = trust[port["domain"]]
        configured = port.get("configured_mac") or port["mac"]
        if known is None or known.get(configured) is None:
            continue  # unknown: libvirt unreachable, or a network NIC that takes its network's setting
        if not known[configured]:
            port["guest_mac_change"] = "not trusted"
        elif not daemon["nic_mac_change_event"]:
            port["guest_mac_change"] = "no event"
        else:
            port["guest_mac_change"] = "followed" if daemon["answering"] else "no daemon"


def daemon_info():
    """Is fdbhookd answering, and can this libvirt report guest MAC changes?"""
    from fdbhook.client import offer, socket_path
    from fdbhook.virt import version_facts

    answer = offer("ping", [], b"", timeout=1.0)
    info = {"socket": socket_path(), "answering": answer is not None, "threads_restarted": {},
            "config_fallback": "", "first_frames_unavailable": ""}
    try:
        health = json.loads(answer[1]) if answer is not None and answer[1] else {}
        info["threads_restarted"] = dict(health.get("threads_restarted") or {})
        info["config_fallback"] = str(health.get("config_fallback") or "")
        info["first_frames_unavailable"] = str(health.get("first_frames_unavailable") or "")
    except (ValueError, TypeError, AttributeError):
        pass  # an older fdbhookd answers the ping with nothing
    info.update(version_facts())
    return info


def bridge_report(config, kernel, br, links, by_ifindex, frr=None):
    """One bridge: its ports, who owns them, drift, and the promiscuity explanation.

    ``frr``: a function returning fdbhook.evpn's FrrView, called only for a
    bridge with a VXLAN port (status: which managed MACs EVPN advertises).
    """
    ports, recs = [], {}
    for link in links:
        if link.master != br.ifindex or not link.is_bridge_port:
            continue
        rec, owner, paused = by_ifindex.get(link.ifindex, (None, None, False))
        if rec is not None and (rec.port != link.name or rec.bridge != br.name):
            rec, owner, paused = None, None, False
        ports.append(_port_dict(kernel, link, rec, owner, br.ifindex, paused))
        recs[link.name] = (rec, paused)
    vxlan = [p["name"] for p in ports if p["kind"] == "vxlan"]
    sticky, why = config.sticky_for(br.name, None, vxlan)
    bridge = {
        "name": br.name,
        "promiscuity": br.promiscuity,
        "vlan_filtering": kernel.bridge_vlan_filtering(br.ifindex),
        "vlan_filtering_supported": _vlan_filtering_supported(br.name),
        "managed_by": config.bridge_managed(br.name),
        "ports": ports,
        "auto_ports": [p["name"] for p in ports if p["learning"] or p["flood"]],
        "vxlan_ports": vxlan,
        "sticky": {"on": sticky, "why": why},
    }
    bridge["explain"] = explain_bridge(bridge)
    if vxlan and frr is not None and any(rec is not None for rec, _ in recs.values()):
        _evpn(bridge, frr(), recs)
    return bridge


def _evpn(bridge, view, recs):
    """Per managed port: has EVPN (FRR's zebra) advertised its MACs? Nothing at all where FRR is absent."""
    from fdbhook.evpn import port_view

    if not view.installed:
        return
    if not view.ok:
        bridge["evpn_error"] = view.error
        return
    for port in bridge["ports"]:
        rec, paused = recs.get(port["name"], (None, False))
        if rec is not None:
            port["evpn"] = {mac: port_view(view, mac, port["name"], paused) for mac in rec.macs}


def _incoming(store, records):
    """{"driver/domain": "first frame" or "first frame, planned ahead"} of paused records marked incoming (a
    live migration's destination: the entries go in at the guest's first frame, or at RESUMED)."""
    try:
        armed = {(d.get("driver"), d.get("domain")) for _, d in store.intents()
                 if isinstance(d, dict) and d.get("armed")}
    except StateError:
        armed = set()
    return {"%s/%s" % (r.driver, r.domain): "first frame" + (", planned ahead" if (r.driver, r.domain) in armed
                                                               else "")
            for r in records if r.paused and store.is_incoming(r.driver, r.domain)}


def _records_by_ifindex(store):
    out = {}
    for record in store.all():
        for rec in record.nics:
            out[rec.ifindex] = (rec, "%s/%s" % (record.driver, record.domain), record.paused)
    return out


def explain(config, kernel, store, name):
    """``fdbhook explain BRIDGE``: any Linux bridge, managed or not; None if there is none."""
    links = kernel.links()
    br = next((link for link in links if link.name == name and link.kind == "bridge"), None)
    if br is None:
        return None
    return bridge_report(config, kernel, br, links, _records_by_ifindex(store))


def render_explain(bridge):
    lines = ["bridge %s: vlan_filtering %s%s, bridge promiscuity %d" % (
        bridge["name"], "on" if bridge["vlan_filtering"] else "off",
        "" if bridge["vlan_filtering_supported"] else " (unsupported by this kernel)", bridge["promiscuity"])]
    for port in bridge["ports"]:
        lines.append("  %-15s %-8s learning %-3s flood %-3s promiscuity %d%s" % (
            port["name"], port["kind"] or "-", "on" if port["learning"] else "off",
            "on" if port["flood"] else "off", port["promiscuity"],
            "  (%s)" % port["domain"] if port["domain"] else ""))
        lines.extend("  %-15s %s" % ("", line) for line in _security_lines(port))
    lines.append("still learning or flooding: %s" % (", ".join(bridge["auto_ports"]) or "none"))
    lines.extend(bridge["explain"])
    lines.append("guest entries %s: %s" % ("sticky" if bridge["sticky"]["on"] else "not sticky", bridge["sticky"]["why"]))
    for port in bridge["ports"]:
        if port["domain"] and port.get("static_entry") and port.get("sticky") != bridge["sticky"]["on"]:
            lines.append("  %s: its entries are %s, as applied before; the next start, reconnect or `fdbhook "
                         "apply` follows the rule" % (port["name"], "sticky" if port.get("sticky") else "not sticky"))
    return "\n".join(lines)


def _once(func):
    answers = []

    def call():
        if not answers:
            answers.append(func())
        return answers[0]
    return call


def collect(config, kernel, store, frr=None):
    """Everything status shows, as JSON-ready dicts.

    ``frr``: fdbhook.evpn.read_macs (the CLI), asked at most once and only if
    a bridge has a VXLAN port; None: no EVPN view.
    """
    if frr is not None:
        frr = _once(frr)
    records = store.all()
    by_ifindex = _records_by_ifindex(store)
    missing = []
    links = kernel.links()
    index = {link.ifindex: link for link in links}
    bridges = {}
    for link in links:
        if link.kind == "bridge" and (config.bridge_managed(link.name)
                                      or any(r.bridge == link.name for r, _, _ in by_ifindex.values())):
            bridges[link.ifindex] = link
    nets = load_networks(list(config.networks), config.network_dirs) if config.networks else {}
    for net in nets.values():
        for link in links:
            if link.kind == "bridge" and link.name == net.bridge:
                bridges[link.ifindex] = link
    out = [bridge_report(config, kernel, br, links, by_ifindex, frr)
           for br in sorted(bridges.values(), key=lambda b: b.name)]
    for record in records:
        for rec in record.nics:
            link = index.get(rec.ifindex)
            if link is None or link.name != rec.port:
                missing.append({"domain": "%s/%s" % (record.driver, record.domain), "mac": rec.mac,
                                "port": rec.port, "bridge": rec.bridge, "drift": ["port gone"]})
    drift = any(p["drift"] for b in out for p in b["ports"]) or bool(missing)
    daemon = daemon_info()
    incoming = _incoming(store, records)
    for bridge in out:
        _guest_mac_change(bridge["ports"], daemon)
        for port in bridge["ports"]:
            if port.get("paused") and port["domain"] in incoming:
                port["incoming"] = incoming[port["domain"]]
    return {
        "config": config.path,
        "config_exists": config.exists,
        "config_fallback": config.fallback,
        "quarantined": store.quarantined(),
        "manage": {"bridges": list(config.bridges), "networks": list(config.networks)},
        "state_dir": config.state_dir,
        "bridges": out,
        "stale_records": missing,
        "pending_ports": lockdown.describe(store),
        "drift": drift,
        "daemon": daemon,
    }


def explain_bridge(bridge):
    """Plain sentences: can the kernel take the uplink out of promiscuous mode?

    br_manage_promisc clears promiscuity only with vlan_filtering on, the
    bridge itself not promiscuous, and at most one port still learning or
    flooding ("auto"); the remaining port must also filter unicast in hardware.
    """
    reasons = []
    if not bridge.get("vlan_filtering_supported", True):
        reasons.append("this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING), "
                       "and the kernel only clears promiscuity on VLAN-filtering bridges")
    elif not bridge["vlan_filtering"]:
        reasons.append("vlan_filtering is off on %s; the kernel only clears promiscuity on "
                       "VLAN-filtering bridges" % bridge["name"])
    if bridge["promiscuity"]:
        reasons.append("the bridge device %s is itself promiscuous" % bridge["name"])
    auto = bridge["auto_ports"]
    if len(auto) > 1:
        reasons.append("%d ports still learn or flood (%s); at most one (the uplink) may"
                       % (len(auto), ", ".join(auto)))
    for port in bridge["ports"]:
        if port["name"] in auto and port["kind"] in NO_UNICAST_FILTER and port["domain"] is None:
            reasons.append("port %s is a %s device, which has no unicast filter, so it stays promiscuous"
                           % (port["name"], port["kind"]))
        if port["name"] in auto and port["domain"] and (port.get("mab") or port.get("floating_macs")):
            reasons.append("guest port %s keeps learning on purpose (%s)" % (
                port["name"], "MAB reports dropped MACs" if port.get("mab") else "floating MACs move by learning"))
    if not reasons:
        return ["the kernel can keep the uplink out of promiscuous mode"]
    return ["promiscuity cannot be cleared: " + r for r in reasons]


def render_text(data):
    """Human-readable status."""
    lines = []
    if data.get("config_fallback"):
        lines.append("CONFIG BAD: %s" % data["config_fallback"])
    if not data["config_exists"]:
        lines.append("no config at %s: nothing is managed" % data["config"])
    else:
        lines.append("config %s: bridges %s, networks %s" % (
            data["config"], " ".join(data["manage"]["bridges"]) or "-",
            " ".join(data["manage"]["networks"]) or "-"))
    for br in data["bridges"]:
        lines.append("")
        lines.append("bridge %s: vlan_filtering %s%s, promiscuity %d, %d learning/flooding port(s)" % (
            br["name"], "on" if br["vlan_filtering"] else "off",
            "" if br["vlan_filtering_supported"] else " (unsupported by kernel)",
            br["promiscuity"], len(br["auto_ports"])))
        for port in br["ports"]:
            lines.append("  %-15s %-9s learning %-3s flood %-3s promisc %d  %s %s%s" % (
                port["name"], port["kind"] or "-", "on" if port["learning"] else "off",
                "on" if port["flood"] else "off", port["promiscuity"],
                port["domain"] or "(not ours)", port["mac"] or "", _entry_word(port)))
            if port.get("guest_mac_change"):
                lines.append("  %-15s %s" % ("", GUEST_MAC_WORDS[port["guest_mac_change"]]))
            if port.get("configured_mac"):
                lines.append("  %-15s guest uses %s instead of its configured MAC %s (followed)" % (
                    "", port["mac"], port["configured_mac"]))
            lines.extend("  %-15s %s" % ("", line) for line in _security_lines(port))
            lines.extend("  %-15s %s" % ("", line) for line in _evpn_lines(port))
            if port["drift"]:
                lines.append("  %-15s DRIFT: %s" % ("", ", ".join(port["drift"])))
        for sentence in br["explain"]:
            lines.append("  " + sentence)
        if br.get("evpn_error"):
            lines.append("  EVPN: FRR did not answer (%s)" % br["evpn_error"])
    for stale in data["stale_records"]:
        lines.append("record %s %s on %s: port %s is gone" % (stale["domain"], stale["mac"], stale["bridge"],
                                                              stale["port"]))
    lines.extend(_pending_lines(data.get("pending_ports") or ()))
    for path in data.get("quarantined") or ():
        lines.append("QUARANTINED record %s: it did not parse; its second copy (if any) was used. Read it, then "
                     "remove it" % path)
    lines.append("")
    daemon = data["daemon"]
    lines.append("fdbhookd: %s (%s)" % ("running" if daemon["answering"] else "not running: hooks work standalone, "
                                        "no hotplug/pause/resume/drift repair", daemon["socket"]))
    if daemon.get("config_fallback") and daemon["config_fallback"] != data.get("config_fallback"):
        lines.append("fdbhookd: CONFIG BAD: %s" % daemon["config_fallback"])
    for name, info in sorted((daemon.get("threads_restarted") or {}).items()):
        lines.append("fdbhookd: thread %s restarted %d time(s) (last: %s)" % (name, info["count"], info["error"]))
    if daemon.get("first_frames_unavailable"):
        lines.append("fdbhookd: incoming migrations get their entries at RESUMED, not at the guest's first frame: "
                     "%s" % daemon["first_frames_unavailable"])
    lines.extend(mac_change_sentences(daemon))
    lines.append("drift: %s" % ("YES" if data["drift"] else "none"))
    if data.get("first_run"):
        lines.append("")
        lines.extend(data["first_run"])
    return "\n".join(lines)


def _pending_lines(pending):
    """Guest ports locked down at their join whose NIC nobody has claimed yet (fdbhook.lockdown)."""
    lines = []
    for pend in pending:
        if pend.get("port") is None:
            lines.append("PENDING port ifindex %d: %s" % (pend["ifindex"], pend["why"]))
            continue
        predicted = sorted({p["mac"] for p in pend.get("predicted") or ()})
        lines.append("PENDING %s on %s: locked down at its join (%s)%s, its NIC not known yet; put back to "
                     "learning %s flood %s in %.0f s unless a NIC claims it" % (
                         pend["port"], pend["bridge"], pend["why"],
                         ", static entry for %s predicted from the port" % " ".join(predicted) if predicted else "",
                         "on" if pend["learning"] else "off", "on" if pend["flood"] else "off", pend["left_s"]))
    return lines


def _security_lines(port):
    lines = []
    if port.get("extra_macs"):
        lines.append("extra MACs (static): %s" % " ".join(port["extra_macs"]))
    if port.get("floating_macs"):
        lines.append("floating MACs (learned, port not locked): %s" % " ".join(port["floating_macs"]))
    if port.get("lock_mode"):
        lines.append("locked: frames from any other source MAC are dropped%s" % (
            "; MAB on (learning on: the uplink stays promiscuous)" if port.get("mab") else ""))
    if port.get("dropped_macs"):
        lines.append("dropped source MACs (MAB): %s - add them to extra-macs if the guest needs them"
                     % " ".join(port["dropped_macs"]))
    return lines


def _evpn_lines(port):
    lines = []
    for mac, view in sorted((port.get("evpn") or {}).items()):
        if view is None:
            continue
        if view["advertised"]:
            text = "EVPN: %s advertised (VNI %s, sequence %s)" % (mac, ",".join(map(str, view["vni"])), view["seq"])
        elif view["problem"] is None:
            text = "EVPN: %s not advertised (guest paused)" % mac
        else:
            text = "EVPN: %s NOT advertised" % mac
        if view["problem"]:
            text += ": " + view["problem"]
        lines.append(text)
    return lines


def _entry_word(port):
    if not port["domain"]:
        return ""
    if port.get("incoming"):  # set only on a paused port
        return "  no entry yet (incoming migration: it goes in at the guest's %s)" % port["incoming"]
    if port.get("paused"):
        return "  entry removed (guest paused)"
    return "  entry %s" % ("ok" if port["static_entry"] else "MISSING")


def mac_change_sentences(daemon):
    """What happens when a guest changes its own MAC, on this host, in plain words."""
    if not daemon["nic_mac_change_event"]:
        return ["guest MAC changes: not followed: libvirt-python %s has no NIC_MAC_CHANGE event (needs >= 11.2); "
                "a guest that changes its MAC gets no unicast for the new one (its port does not flood)"
                % (daemon["libvirt_python"] or "(python bindings missing)")]
    if not daemon["answering"]:
        return ["guest MAC changes: followed only while fdbhookd runs (it is not running); otherwise at the "
                "next start or reconnect"]
    return ["guest MAC changes: followed for NICs with trustGuestRxFilters='yes' (libvirt reports the new MAC); "
            "with 'no' libvirt reports nothing, the configured MAC keeps the entry, and a guest that uses "
            "another MAC gets no unicast for it"]
