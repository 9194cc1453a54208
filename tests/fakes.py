"""A fake of fdbhook.kernel.Kernel for fast unit tests (never the root tier).

It keeps links, VLAN membership and bridge FDB entries in dicts and applies
plan ops the way the kernel does, so engine logic can be tested without root.
On errors it behaves like the real adapter (tests/kernel/test_adapter_contract.py
runs the same scenarios against both): the ops go in the same stages
(plan.stages), every op of a stage runs even after a failed one, the first
failure is raised once the stage is done and later stages are not run.
"""

from dataclasses import replace

from fdbhook.errors import KernelError
from fdbhook.model import FdbEntry, Link


class FakeKernel:
    def __init__(self, links=(), entries=()):
        self.links_by_index = {link.ifindex: link for link in links}
        self.entries = {}  # (bridge ifindex, mac, vid; 0 = no VLAN) -> FdbEntry
        for bridge_ifindex, entry in entries:
            self.entries[(bridge_ifindex, entry.mac, entry.vlan)] = entry
        self.filtering = {}  # bridge ifindex -> bool
        self.vlan_supported = True
        self.vlans = {}  # port ifindex -> {vid: (pvid, untagged)}
        self.sticky_supported = True
        self.executed = []
        self.fail_on = None  # op kind that raises, to test rollback
        self.fail_port = None  # ... only on this port

    @classmethod
    def bridge_with_ports(cls, bridge="br0", ports=("vnet0",), start=10):
        links = [Link(name=bridge, ifindex=start, kind="bridge")]
        for i, name in enumerate(ports, 1):
            links.append(Link(name=name, ifindex=start + i, kind="tun", master=start,
                              is_bridge_port=True, learning=True, flood=True, locked=False, mab=False))
        kernel = cls(links)
        for i in range(1, len(ports) + 1):
            kernel.vlans[start + i] = {1: (True, True)}
        return kernel

    def add_entry(self, bridge_ifindex, entry):
        self.entries[(bridge_ifindex, entry.mac, entry.vlan)] = entry

    def remove_link(self, name):
        link = self.by_name(name)
        del self.links_by_index[link.ifindex]
        self.entries = {k: e for k, e in self.entries.items() if e.ifindex != link.ifindex}

    def by_name(self, name):
        for link in self.links_by_index.values():
            if link.name == name:
                return link
        return None

    def by_index(self, ifindex):
        return self.links_by_index.get(ifindex)

    def fdb_get(self, mac, bridge_ifindex, vlan=0):
        return self.entries.get((bridge_ifindex, mac, vlan))

    def vxlan_ports(self, bridge_ifindex):
        return tuple(link for link in self.links_by_index.values()
                     if link.master == bridge_ifindex and link.kind == "vxlan")

    def locked_entries(self, port_ifindex):
        return sorted((e.mac, e.vlan) for e in self.entries.values() if e.ifindex == port_ifindex and e.locked)

    def port_entries(self, port_ifindex):
        return [e for e in self.entries.values() if e.ifindex == port_ifindex]

    def links(self):
        return list(self.links_by_index.values())

    def announce(self, entries):
        present = [e for e in entries if e in self.entries.values()]
        self.announced = getattr(self, "announced", []) + present
        return len(present)

    def bridge_vlan_filtering(self, ifindex):
        return self.filtering.get(ifindex, False)

    def port_vlans(self, ifindex):
        return tuple(sorted((vid,) + flags for vid, flags in self.vlans.get(ifindex, {}).items()))

    def forget(self):
        self.forgets = getattr(self, "forgets", 0) + 1

    def prefetch(self, names=(), indexes=(), fdb=(), vxlan=(), vlans=()):
        """The real adapter batches these reads; the fake answers every read directly."""
        self.prefetched = getattr(self, "prefetched", []) + [(tuple(names), tuple(indexes), tuple(fdb))]

    def bridge_for(self, name):
        link = next((l for l in self.links_by_index.values() if l.name == name and l.kind == "bridge"), None)
        return link.ifindex if link is not None else None

    @staticmethod
    def capabilities(release=None):
        return {"sticky": True, "locked": True, "mab": True}

    def vlan_filtering_capable(self, bridge_ifindex):
        return self.vlan_supported

    def execute_many(self, ops):
        from fdbhook.plan import stages

        for stage in stages(list(ops)):
            failed = None
            for op in stage:
                try:
                    self._one(op)
                except KernelError as exc:
                    if not (op.kind in ("fdb_del", "vlan_del") and exc.kwargs.get("errno") in (2, 19)):
                        failed = failed or exc
            if failed is not None:
                raise failed

    def close(self):
        pass

    def _one(self, op):
        from fdbhook.plan import render

        if self.fail_on == op.kind and self.fail_port in (None, op.port):
            raise KernelError(what=render(op), reason="injected failure")
        self.executed.append(op)
        if op.kind == "bridge_set":
            if op.vlan_filtering and not self.vlan_supported:
                raise KernelError(what=render(op), reason="Operation not supported (errno 95)", errno=95)
            self.filtering[op.ifindex] = op.vlan_filtering
            return
        link = self.links_by_index.get(op.ifindex)
        if link is None:
            raise KernelError(what=render(op), reason="No such device (errno 19)", errno=19)
        if op.kind == "set_flags":
            changes = {}
            if op.learning is not None:
                changes["learning"] = op.learning
            if op.flood is not None:
                changes["flood"] = op.flood
            for flag in ("locked", "mab"):
                if getattr(op, flag) is not None:
                    if getattr(link, flag) is None:
                        raise KernelError(what=render(op), reason="Invalid argument (errno 22)", errno=22)
                    changes[flag] = getattr(op, flag)
            new = replace(link, **changes)
            if new.mab and not (new.locked and new.learning):  # as br_setport refuses it
                raise KernelError(what=render(op), reason="Invalid argument (errno 22)", errno=22)
            self.links_by_index[op.ifindex] = new
        elif op.kind == "fdb_replace":
            if op.vlan and op.vlan not in self.vlans.get(op.ifindex, {}):
                raise KernelError(what=render(op), reason="Invalid argument (errno 22)", errno=22)
            self.entries[(link.master, op.mac, op.vlan)] = FdbEntry(
                mac=op.mac, ifindex=op.ifindex, static=True, local=False, sticky=op.sticky, vlan=op.vlan)
        elif op.kind == "fdb_del":
            entry = self.entries.get((link.master, op.mac, op.vlan))
            if entry is not None and entry.ifindex == op.ifindex:
                del self.entries[(link.master, op.mac, op.vlan)]
        elif op.kind == "flush":
            self.entries = {k: e for k, e in self.entries.items()
                            if not (e.ifindex == op.ifindex and e.dynamic)}
        elif op.kind == "vlan_add":
            self.vlans.setdefault(op.ifindex, {})[op.vlan] = (op.pvid, op.untagged)
        elif op.kind == "vlan_del":
            self.vlans.get(op.ifindex, {}).pop(op.vlan, None)
