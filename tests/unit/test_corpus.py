"""Every XML file of libvirt's own test suite parses; every NIC gets a reason."""

import glob
import os

import pytest

from fdbhook import domxml
from fdbhook.config import parse_config
from fdbhook.errors import InvalidDomainXML
from fdbhook.policy import decide_domain
from fdbhook.resolve import DictLinks

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.environ.get("FDBHOOK_CORPUS") or os.path.normpath(
    os.path.join(HERE, "..", "..", "..", "shared", "corpus"))
FILES = sorted(glob.glob(os.path.join(CORPUS, "**", "*.xml"), recursive=True))
EVERYTHING = parse_config("[manage]\nbridges = *\nnetworks = *\n", env={})


def test_corpus_is_there():
    if not FILES:
        pytest.skip("libvirt corpus not found at %s (set FDBHOOK_CORPUS)" % CORPUS)
    assert len(FILES) == 208


@pytest.mark.parametrize("path", FILES, ids=[os.path.relpath(f, CORPUS) for f in FILES])
def test_corpus_file(path):
    with open(path, "rb") as handle:
        data = handle.read()
    root = domxml.parse_document(data, what=os.path.basename(path))
    if root.tag == "network":
        net = domxml.network_from_element(root)
        assert net.name
        return
    assert root.tag == "domain"
    try:
        dom = domxml.domain_from_element(root)
    except InvalidDomainXML as exc:
        # A refusal must be one line naming the domain.
        assert "\n" not in str(exc) and str(exc).startswith("domain ")
        return
    decisions = decide_domain(dom, EVERYTHING, {}, DictLinks())
    assert len(decisions) == len(dom.nics)
    for d in decisions:
        assert d.action in ("manage", "skip", "error")
        assert d.reason and d.nic.label
