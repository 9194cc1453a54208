"""Safe parsing of libvirt domain and network XML into model objects.

The input comes from libvirtd (or an admin replaying a hook), but we treat it
as hostile all the same: no DTDs, no entity expansion, no network or file
access, and a size cap checked before parsing.
"""

from lxml import etree

from fdbhook import MAX_INPUT_BYTES
from fdbhook.errors import InvalidDomainXML
from fdbhook.model import FDB_NS, Domain, Network, Nic, mac_problem, normalize_mac

# libvirt's largest real domain XML is a few hundred KiB; 8 MiB is generous.
MAX_XML_BYTES = MAX_INPUT_BYTES


def _parser():
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_document(data, what="?"):
    """Parse bytes into an element, refusing DTDs, entities and oversize input."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > MAX_XML_BYTES:
        raise InvalidDomainXML(domain=what, reason="document larger than %d bytes" % MAX_XML_BYTES)
    if not data.strip():
        raise InvalidDomainXML(domain=what, reason="empty input")
    # libvirt never sends a DOCTYPE; refusing it outright closes entity tricks
    # (billion laughs, external entities) before libxml2 sees them.
    if b"<!DOCTYPE" in data.upper() or b"<!ENTITY" in data.upper():
        raise InvalidDomainXML(domain=what, reason="DTDs and entities are not allowed")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise InvalidDomainXML(domain=what, reason=reason) from None
    if root is None:
        raise InvalidDomainXML(domain=what, reason="no root element")
    return root


def parse_vlan_spec(text):
    """'100-110,120' -> (100, ..., 110, 120). Raises ValueError on bad input."""
    vids = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            lo, hi = int(lo), int(hi)
            if lo > hi:
                raise ValueError("range %s is backwards" % part)
            rng = range(lo, hi + 1)
        else:
            rng = [int(part)]
        for vid in rng:
            if not 1 <= vid <= 4094:
                raise ValueError("VLAN %d is outside 1-4094" % vid)
            vids.add(vid)
    return tuple(sorted(vids))


def _attr(elem, path, name):
    if elem is None:
        return None
    child = elem.find(path) if path else elem
    if child is None:
        return None
    value = child.get(name)
    return value.strip() if value is not None else None


def _text(elem, path):
    child = elem.find(path)
    if child is None or child.text is None:
        return None
    return child.text.strip() or None


def _metadata(root, domain_name):
    """Read <fdb:fdb> from <metadata>: (domain mode, {mac: (mode, vlan, trunk)})."""
    meta = root.find("metadata/{%s}fdb" % FDB_NS)
    if meta is None:
        return "on", {}
    mode = (meta.get("mode") or "on").strip().lower()
    if mode not in ("on", "off"):
        raise InvalidDomainXML(domain=domain_name, reason="fdb:fdb mode=%r (want on or off)" % mode)
    per_nic = {}
    for elem in meta.findall("{%s}interface" % FDB_NS):
        raw = elem.get("mac")
        mac = normalize_mac(raw)
        if mac is None:
            raise InvalidDomainXML(domain=domain_name, reason="fdb:interface mac=%r is not a MAC address" % raw)
        nic_mode = (elem.get("mode") or "on").strip().lower()
        if nic_mode not in ("on", "off"):
            raise InvalidDomainXML(domain=domain_name,
                                   reason="fdb:interface %s mode=%r (want on or off)" % (mac, nic_mode))
        vlan = None
        trunk = ()
        try:
            if elem.get("vlan"):
                vids = parse_vlan_spec(elem.get("vlan"))
                if len(vids) != 1:
                    raise ValueError("access vlan must be one VLAN id")
                vlan = vids[0]
            if elem.get("trunk"):
                trunk = parse_vlan_spec(elem.get("trunk"))
        except ValueError as exc:
            raise InvalidDomainXML(domain=domain_name,
                                   reason="NIC %s: bad VLAN spec: %s" % (mac, exc)) from None
        extra = {}
        for attr in ("extra-macs", "floating-macs"):
            try:
                extra[attr] = _mac_list(elem.get(attr))
            except ValueError as exc:
                raise InvalidDomainXML(domain=domain_name, reason="NIC %s: %s %s" % (mac, attr, exc)) from None
        locked = elem.get("locked")
        if locked is not None:
            locked = locked.strip().lower()
            if locked not in ("yes", "no"):
                raise InvalidDomainXML(domain=domain_name,
                                       reason="NIC %s: locked=%r (want yes or no)" % (mac, locked))
            locked = locked == "yes"
        per_nic[mac] = (nic_mode, vlan, trunk, extra["extra-macs"], locked, extra["floating-macs"])
    return mode, per_nic


def _mac_list(text):
    """Space- or comma-separated unicast MACs, normalised; ValueError says which one is bad and why."""
    out = []
    for raw in (text or "").replace(",", " ").split():
        mac = normalize_mac(raw)
        if mac is None:
            raise ValueError("%r is not a MAC address" % raw)
        problem = mac_problem(mac)
        if problem:
            raise ValueError(problem)
        if mac not in out:
            out.append(mac)
    return tuple(out)


def _interface(elem, index, per_nic):
    raw_mac = _attr(elem, "mac", "address")
    mac = normalize_mac(raw_mac) if raw_mac else None
    # libvirt >= 11.2 keeps the configured address and reports a MAC the
    # guest set itself (trustGuestRxFilters='yes') as currentAddress: that
    # is the MAC in use, so it is the one fdbhook manages. Metadata keeps
    # naming the NIC by its configured address.
    current = normalize_mac(_attr(elem, "mac", "currentAddress"))
    mode, vlan, trunk, extra_macs, locked, floating = per_nic.get(mac, ("on", None, (), (), None, ()))
    return Nic(
        index=index,
        type=(elem.get("type") or "").strip(),
        # Keep an unparseable MAC visible so the error can name it.
        mac=current or mac or raw_mac,
        config_mac=mac if current and current != mac else None,
        source_bridge=_attr(elem, "source", "bridge"),
        source_network=_attr(elem, "source", "network"),
        source_mtm=_attr(elem, "source", "macTableManager"),
        target_dev=_attr(elem, "target", "dev"),
        guest_dev=_attr(elem, "guest", "dev"),
        guest_actual=_attr(elem, "guest", "actual"),
        alias=_attr(elem, "alias", "name"),
        mode=mode,
        vlan=vlan,
        trunk=trunk,
        extra_macs=extra_macs,
        locked=locked,
        floating_macs=floating,
    )


def domain_from_element(root, driver=None, what="?"):
    """Build a Domain from a parsed <domain> element."""
    if root.tag != "domain":
        raise InvalidDomainXML(domain=what, reason="root element is <%s>, expected <domain>" % root.tag)
    # The name exactly as libvirt has it (and passes it as the hooks' argv):
    # records, teardown and log lines all use this one spelling.
    name_elem = root.find("name")
    name = name_elem.text if name_elem is not None else None
    if not name or not name.strip():
        raise InvalidDomainXML(domain=what, reason="no <name>")
    dtype = (root.get("type") or "").strip()
    if driver is None:
        driver = "lxc" if dtype == "lxc" else "qemu"
    mode, per_nic = _metadata(root, name)
    nics = tuple(_interface(elem, i, per_nic) for i, elem in enumerate(root.findall("devices/interface")))
    return Domain(name=name, driver=driver, uuid=_text(root, "uuid"), nics=nics, mode=mode)


def parse_domain(data, driver=None, what="?"):
    """Parse domain XML bytes into a Domain. Raises InvalidDomainXML."""
    return domain_from_element(parse_document(data, what), driver, what)


def guest_mac_trust(data, what="?"):
    """{configured MAC: trustGuestRxFilters is 'yes'} for each NIC of a domain's XML.

    Only with 'yes' does libvirt (>= 11.2) report a MAC the guest sets
    itself; with 'no' (the default) it reports nothing at all. A
    type='network' NIC without the attribute takes its network's (or
    portgroup's) setting, which the domain XML does not show: None.
    """
    out = {}
    for elem in parse_document(data, what).findall("devices/interface"):
        mac = normalize_mac(_attr(elem, "mac", "address"))
        trust = (elem.get("trustGuestRxFilters") or "").strip()
        if mac:
            out[mac] = trust == "yes" if trust or elem.get("type") != "network" else None
    return out


def network_from_element(root):
    """Build a Network from <network>, <networkstatus> or <hookData>."""
    if root.tag in ("networkstatus", "hookData"):
        inner = root.find("network")
        if inner is None:
            raise InvalidDomainXML(domain="?", reason="<%s> holds no <network>" % root.tag)
        root = inner
    if root.tag != "network":
        raise InvalidDomainXML(domain="?", reason="root element is <%s>, expected <network>" % root.tag)
    name = _text(root, "name")
    if not name:
        raise InvalidDomainXML(domain="?", reason="network without <name>")
    return Network(
        name=name,
        bridge=_attr(root, "bridge", "name"),
        mac_table_manager=_attr(root, "bridge", "macTableManager"),
        forward_mode=_attr(root, "forward", "mode"),
    )


def parse_network(data, what="?"):
    return network_from_element(parse_document(data, what))
