"""A seeded random lifecycle soak (tests/soak.py): 200 operations on QEMU and LXC guests, 0 violations.

A private libvirtd in its own namespaces (never the machine's); start,
destroy, suspend/resume, NIC attach/detach, libvirtd restart, fdbhookd kill -9
and restart, config reload (with typos), the invariant checked after each.
The seed is fixed per run from $FDBHOOK_SOAK_SEED or the date, and printed:
``python3 -m tests.soak --seed S --ops 200`` replays a failure.
"""

import json
import os
import time

import pytest

pytestmark = pytest.mark.libvirt

REQUIRED = os.environ.get("FDBHOOK_E2E_REQUIRED") == "1"


def test_soak_200_operations(record_property):
    from tests import soak

    if os.environ.get("FDBHOOK_SKIP_LIBVIRT") == "1":
        pytest.skip("FDBHOOK_SKIP_LIBVIRT=1")
    if os.environ.get("FDBHOOK_STACK"):
        pytest.skip("the soak builds its own libvirt host on the machine, not inside %s" % os.environ["FDBHOOK_STACK"])
    why = soak.available()
    if why:
        if REQUIRED:
            pytest.fail("soak: %s (FDBHOOK_E2E_REQUIRED=1)" % why, pytrace=False)
        pytest.skip(why)
    seed = int(os.environ.get("FDBHOOK_SOAK_SEED") or time.strftime("%Y%m%d"))
    print("soak seed %d (replay: python3 -m tests.soak --seed %d --ops 200)" % (seed, seed))
    summary = soak.soak(200, seed)
    record_property("soak", json.dumps({k: summary[k] for k in ("seed", "ops", "seconds", "counts")}))
    print(json.dumps({k: v for k, v in summary.items() if k != "fdbhookd_log_tail"}, sort_keys=True))
    assert summary["ops"] == 200 and not summary["violations"], (
        "seed %d: %s\n%s" % (seed, json.dumps(summary["violations"], indent=1), summary["fdbhookd_log_tail"]))
