"""Nothing in the state directory may kill a reader (issue 18 item 4): the seven bad-record kinds.

Each bad main record is quarantined (renamed aside, listed by ``quarantined``)
and its second copy (written by every save before the main file) takes its
place, so teardown still knows the ports' original state.
"""

import json
import os

import pytest

from fdbhook.model import DomainRecord, NicRecord
from fdbhook.state import BadRecord, Store, parse_record

GOOD = DomainRecord(driver="qemu", domain="g", nics=(
    NicRecord(mac="52:54:00:00:00:01", port="vnet1", ifindex=11, bridge="br0", prev_learning=True,
              prev_flood=False),))

BAD = {
    "invalid JSON": b"{not json",
    "null": b"null",
    "nics of numbers": b'{"driver": "qemu", "domain": "g", "nics": [5]}',
    "deeply nested": b"[" * 100000 + b"]" * 100000,
    "wrong types": b'{"driver": "qemu", "domain": "g", "nics": [{"mac": 1, "port": "v", "ifindex": "x", '
                   b'"bridge": "br0"}]}',
    "truncated": None,  # the good record cut in half
    "binary garbage": bytes(range(256)) * 4,
}


def _bad_bytes(kind, store):
    if BAD[kind] is None:
        with open(store.path("qemu", "g"), "rb") as handle:
            raw = handle.read()
        return raw[:len(raw) // 2]
    return BAD[kind]


@pytest.mark.parametrize("kind", sorted(BAD))
def test_parse_record_raises_only_bad_record(kind):
    raw = BAD[kind] if BAD[kind] is not None else json.dumps({"driver": "qemu"}).encode()[:9]
    with pytest.raises(BadRecord):
        parse_record(raw)


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize("reader", ["load", "all"])
def test_bad_record_quarantined_and_salvaged(tmp_path, kind, reader, lines):
    store = Store(str(tmp_path))
    store.save(GOOD)
    with open(store.path("qemu", "g"), "wb") as handle:
        handle.write(_bad_bytes(kind, store))
    got = store.load("qemu", "g") if reader == "load" else store.all()
    assert got == (GOOD if reader == "load" else [GOOD])
    assert len(store.quarantined()) == 1
    assert store.load("qemu", "g") == GOOD  # restored in place: read again without a new quarantine
    assert len(store.quarantined()) == 1
    assert sum("moved to" in r.getMessage() for r in lines) == 1


@pytest.fixture
def lines():
    """Records of fdbhook.state."""
    from tests.helpers import LogRecords

    with LogRecords("fdbhook.state") as records:
        yield records


def test_both_copies_bad_gives_no_record(tmp_path):
    store = Store(str(tmp_path))
    store.save(GOOD)
    for path in (store.path("qemu", "g"), store.prev_path(store.path("qemu", "g"))):
        with open(path, "wb") as handle:
            handle.write(b"null")
    assert store.load("qemu", "g") is None
    assert store.all() == []
    assert len(store.quarantined()) == 2


def test_remove_takes_both_copies(tmp_path):
    store = Store(str(tmp_path))
    store.save(GOOD)
    store.remove("qemu", "g")
    assert os.listdir(store.domain_dir) == [] and os.listdir(store.prev_dir) == []


def test_bad_bridge_record_is_quarantined_and_its_second_copy_takes_its_place(tmp_path):
    store = Store(str(tmp_path))
    store.save_bridge("br0", {"bridge": "br0", "prev_vlan_filtering": False})
    with open(store.bridge_path("br0"), "w") as handle:
        handle.write("[1, 2")
    assert store.load_bridge("br0") == {"bridge": "br0", "prev_vlan_filtering": False}
    assert len(store.quarantined()) == 1 and not os.path.exists(store.bridge_prev_path("br0"))
    with open(store.bridge_path("br0")) as handle:
        assert json.load(handle)["prev_vlan_filtering"] is False  # put back in place of the bad file
    store.save_bridge("br0", {"bridge": "br0", "prev_vlan_filtering": True})
    for victim in (store.bridge_path("br0"), store.bridge_prev_path("br0")):
        with open(victim, "w") as handle:
            handle.write("null")
    assert store.load_bridge("br0") is None and len(store.quarantined()) == 3  # both bad: the state is unknown
    assert store.bridge_names() == []
    store.save_bridge("br0", {"bridge": "br0"})
    store.remove_bridge("br0")
    assert store.bridge_names() == [] and os.listdir(os.path.dirname(store.bridge_prev_path("br0"))) == []


def test_orphan_temp_files_cleaned(tmp_path):
    store = Store(str(tmp_path))
    store.save(GOOD)
    for directory in (store.domain_dir, store.prev_dir):
        with open(os.path.join(directory, ".tmp-abc"), "w") as handle:
            handle.write("{")
    with store.lock():
        assert store.clean_temp_files() == 2
    assert not [n for n in os.listdir(store.domain_dir) + os.listdir(store.prev_dir) if n.startswith(".tmp-")]
    assert store.load("qemu", "g") == GOOD


def test_a_live_writer_keeps_its_temp_file(tmp_path):
    """The sweep (under the lock) spares a temp file a lock-free writer still alive is writing (a salvage
    in another thread of fdbhookd, another process): only a dead writer's leftovers go."""
    import subprocess

    store = Store(str(tmp_path))
    store.save(GOOD)
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.path.join(store.domain_dir, ".tmp-%d-%s" % (os.getpid(), "ab" * 8))
    gone = os.path.join(store.domain_dir, ".tmp-%d-%s" % (dead.pid, "cd" * 8))
    for path in (live, gone):
        with open(path, "w") as handle:
            handle.write("{")
    with store.lock():
        assert store.clean_temp_files() == 1
    assert os.path.exists(live) and not os.path.exists(gone)


def test_a_record_only_its_second_copy_holds_is_put_back(tmp_path, lines):
    """Quarantined on a full disk (the copy could not be put back), or deleted: the next reader, and the
    next teardown, still find the ports' original state."""
    store = Store(str(tmp_path))
    store.save(GOOD)
    os.unlink(store.path("qemu", "g"))
    assert store.has_record("qemu", "g")
    assert store.all() == [GOOD]  # listed from the second copy, and put back
    assert os.path.exists(store.path("qemu", "g")) and store.load("qemu", "g") == GOOD
    assert any("missing, its second copy is there" in r.getMessage() for r in lines)
    os.unlink(store.path("qemu", "g"))
    assert store.load("qemu", "g") == GOOD


def test_a_second_copy_alone_is_left_while_an_operation_on_it_is_under_way(tmp_path):
    """A save writes the copy before the file: between the two (its intent on disk) a reader must not
    take the copy for a record; recovery settles it."""
    store = Store(str(tmp_path))
    store.save(GOOD)
    os.unlink(store.path("qemu", "g"))
    store.save_intent("qemu", "g", {"format": 1})
    assert store.load("qemu", "g") is None and store.all() == []
    assert not os.path.exists(store.path("qemu", "g"))
    store.remove_intent("qemu", "g")
    assert store.load("qemu", "g") == GOOD


def test_a_quarantined_record_not_put_back_on_a_full_disk_is_put_back_later(tmp_path, monkeypatch):
    import fdbhook.state as state
    from fdbhook.errors import StateError

    store = Store(str(tmp_path))
    store.save(GOOD)
    with open(store.path("qemu", "g"), "wb") as handle:
        handle.write(b"null")

    def full(path, data):
        raise StateError(path=path, reason="No space left on device")

    monkeypatch.setattr(state, "_create_if_absent", full)
    assert store.load("qemu", "g") == GOOD  # from the copy, this once
    assert not os.path.exists(store.path("qemu", "g"))
    monkeypatch.undo()
    assert store.has_record("qemu", "g") and store.all() == [GOOD]  # the disk has room again
    assert os.path.exists(store.path("qemu", "g")) and len(store.quarantined()) == 1
