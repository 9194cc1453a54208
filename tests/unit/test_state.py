import fcntl
import multiprocessing
import os

import pytest

from fdbhook.model import DomainRecord, NicRecord
from fdbhook.state import Store


def rec(name, n=1):
    return DomainRecord(driver="qemu", domain=name, uuid=None, nics=tuple(
        NicRecord(mac="52:54:00:00:00:%02x" % i, port="vnet%d" % i, ifindex=10 + i, bridge="br0")
        for i in range(n)))


def test_roundtrip_and_remove(tmp_path):
    store = Store(str(tmp_path))
    store.save(rec("a", 2))
    assert store.load("qemu", "a") == rec("a", 2)
    store.save(rec("a", 0))
    assert store.load("qemu", "a") is None
    assert not [f for f in os.listdir(store.domain_dir) if f.startswith(".tmp")]


def test_odd_domain_names_stay_inside(tmp_path):
    store = Store(str(tmp_path))
    for name in ("../../etc/passwd", ".hidden", "a b/c", "ünï"):
        store.save(rec(name))
        assert os.path.dirname(store.path("qemu", name)) == store.domain_dir
        assert store.load("qemu", name).domain == name
    assert len(store.all()) == 4


def test_corrupt_record_is_quarantined(tmp_path):
    store = Store(str(tmp_path))
    os.makedirs(store.domain_dir)
    with open(store.path("qemu", "x"), "w") as handle:
        handle.write("{not json")
    assert store.load("qemu", "x") is None
    assert store.all() == []
    assert [os.path.basename(p).split(".json")[0] for p in store.quarantined()] == ["qemu-x"]


def _bump(path, n):
    store = Store(path)
    for _ in range(n):
        with store.lock():
            current = store.load("qemu", "counter")
            count = len(current.nics) if current else 0
            store.save(rec("counter", count + 1))


def test_a_lock_file_opened_ahead_locks_the_same_file_and_stays_open(tmp_path):
    store = Store(str(tmp_path))
    fd = store.lock_file()
    try:
        other = os.open(os.path.join(store.state_dir, "lock"), os.O_RDWR)
        try:
            with store.lock(fd):
                with pytest.raises(BlockingIOError):  # anyone else's lock waits meanwhile
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the block
            fcntl.flock(other, fcntl.LOCK_UN)
        finally:
            os.close(other)
        os.fstat(fd)  # still open: the caller closes it
    finally:
        os.close(fd)


def test_lock_serialises_read_modify_write(tmp_path):
    procs = [multiprocessing.Process(target=_bump, args=(str(tmp_path), 10)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert len(Store(str(tmp_path)).load("qemu", "counter").nics) == 40
