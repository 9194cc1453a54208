"""What `status` says about a guest changing its own MAC, per NIC (no root, no libvirt)."""

from fdbhook import status
from fdbhook.domxml import guest_mac_trust

XML = b"""<domain type='qemu'><name>g</name><devices>
<interface type='bridge' trustGuestRxFilters='yes'><mac address='52:54:00:AA:00:01' currentAddress='52:54:00:aa:00:09'/>
<source bridge='br0'/></interface>
<interface type='bridge'><mac address='52:54:00:aa:00:02'/><source bridge='br0'/></interface>
<interface type='network'><mac address='52:54:00:aa:00:03'/><source network='n1'/></interface>
<interface type='network' trustGuestRxFilters='no'><mac address='52:54:00:aa:00:04'/><source network='n1'/></interface>
</devices></domain>"""


def test_trust_is_read_per_configured_mac():
    # A network NIC without the attribute takes its network's setting: unknown from the domain XML.
    assert guest_mac_trust(XML) == {"52:54:00:aa:00:01": True, "52:54:00:aa:00:02": False,
                                    "52:54:00:aa:00:03": None, "52:54:00:aa:00:04": False}


def _ports():
    return [{"domain": "qemu/g", "mac": "52:54:00:aa:00:09", "configured_mac": "52:54:00:aa:00:01"},
            {"domain": "qemu/g", "mac": "52:54:00:aa:00:02"},
            {"domain": "qemu/g", "mac": "52:54:00:aa:00:03"},
            {"domain": None, "mac": None}]


def test_each_case_in_words(monkeypatch):
    monkeypatch.setattr(status, "guest_mac_trust_of", lambda driver, name: guest_mac_trust(XML))
    cases = {(True, True): "followed", (True, False): "no daemon", (False, True): "no event"}
    for (event, answering), word in cases.items():
        ports = _ports()
        status._guest_mac_change(ports, {"nic_mac_change_event": event, "answering": answering})
        assert [p.get("guest_mac_change") for p in ports] == [word, "not trusted", None, None]
    assert "libvirt reports nothing" in status.GUEST_MAC_WORDS["not trusted"]
    assert "no unicast" in status.GUEST_MAC_WORDS["not trusted"]


def test_unknown_without_libvirt(monkeypatch):
    monkeypatch.setattr(status, "guest_mac_trust_of", lambda driver, name: None)
    ports = _ports()
    status._guest_mac_change(ports, {"nic_mac_change_event": True, "answering": True})
    assert all("guest_mac_change" not in p for p in ports)
