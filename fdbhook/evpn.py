"""FRR's view of EVPN MACs, for ``fdbhook status`` and fdbhookd. The only place that runs vtysh.

The CLI and fdbhookd's Announce job (engine.announce_to_frr) call this; a
hook never does (it must not wait on another daemon). ``read_macs`` runs ``vtysh [-N PATHSPACE] -c 'show evpn mac vni all
json'`` (PATHSPACE from $FDBHOOK_FRR_PATHSPACE, for an FRR started with
``-N``); ``parse_macs`` turns its JSON into plain dicts and is pure.
"""

import json
import os
import shutil
import subprocess

COMMAND = "show evpn mac vni all json"
TIMEOUT = 5.0


class FrrView:
    """What vtysh said: ``macs`` {MAC: [entry, ...]} (one per VNI), or why there is none.

    ``installed`` False: no vtysh here (FRR absent: say nothing). ``error``:
    vtysh is there but gave no answer (FRR not running, say so once).
    """

    def __init__(self, installed, macs=None, error=None):
        self.installed = installed
        self.macs = macs or {}
        self.error = error

    @property
    def ok(self):
        return self.installed and self.error is None


def parse_macs(text):
    """{MAC: [{'vni', 'type', 'intf', 'vtep', 'local_seq', 'remote_seq', 'duplicate', 'moves'}, ...]}. Pure.

    ``text`` is the JSON of ``show evpn mac vni all json`` (FRR 8.x/10.x):
    {VNI: {"numMacs": N, "macs": {MAC: {"type": "local"|"remote", "intf",
    "remoteVtep", "localSequence", "remoteSequence", "detectionCount",
    "isDuplicate"}}}}. ValueError if it is not that.
    """
    data = json.loads(text) if text.strip() else {}
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object per VNI, got %s" % type(data).__name__)
    out = {}
    for vni, block in sorted(data.items()):
        if not isinstance(block, dict) or not isinstance(block.get("macs", {}), dict):
            raise ValueError("VNI %s: no 'macs' object" % vni)
        for mac, info in block.get("macs", {}).items():
            out.setdefault(mac.lower(), []).append({
                "vni": int(vni) if str(vni).isdigit() else vni,
                "type": info.get("type"),
                "intf": info.get("intf"),
                "vtep": info.get("remoteVtep"),
                "local_seq": info.get("localSequence"),
                "remote_seq": info.get("remoteSequence"),
                "moves": info.get("detectionCount"),
                "duplicate": bool(info.get("isDuplicate")),
            })
    return out


def vtysh_argv(vtysh, pathspace=None):
    return [vtysh] + (["-N", pathspace] if pathspace else []) + ["-c", COMMAND]


def read_macs(env=None, run=subprocess.run, which=shutil.which):
    """Ask FRR (vtysh) for its EVPN MACs: a FrrView. Never raises."""
    env = os.environ if env is None else env
    vtysh = which("vtysh", path=env.get("PATH", os.defpath) + ":/usr/bin:/usr/local/bin")
    if vtysh is None:
        return FrrView(installed=False)
    argv = vtysh_argv(vtysh, env.get("FDBHOOK_FRR_PATHSPACE") or None)
    try:
        proc = run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return FrrView(installed=True, error="%s: %s" % (" ".join(argv), exc))
    if proc.returncode != 0:
        # vtysh prints "Exiting: failed to connect to any daemons." when zebra is not running.
        lines = [line for line in (proc.stderr or proc.stdout or "").splitlines()
                 if line.strip() and not line.startswith("% Can't open configuration file")]
        return FrrView(installed=True, error="%s: exit %d%s" % (
            " ".join(argv), proc.returncode, ": " + lines[-1].strip() if lines else ""))
    try:
        return FrrView(installed=True, macs=parse_macs(proc.stdout))
    except ValueError as exc:
        return FrrView(installed=True, error="%s: unreadable answer: %s" % (" ".join(argv), exc))


def port_view(view, mac, port, paused):
    """What FRR knows of one managed MAC on ``port``: a dict for status (None: FRR absent).

    advertised: FRR has it as a local MAC on this port (so it sends a type-2
    route). Otherwise ``problem`` says why not in words; a paused guest's
    MAC is rightly not advertised.
    """
    if view is None or not view.ok:
        return None
    entries = view.macs.get(mac.lower(), [])
    local = [e for e in entries if e["type"] == "local" and e["intf"] == port]
    out = {"advertised": bool(local), "vni": [e["vni"] for e in local] or [e["vni"] for e in entries],
           "duplicate": any(e["duplicate"] for e in entries), "problem": None}
    if local:
        out["seq"] = max(e["local_seq"] or 0 for e in local)
    remote = [e for e in entries if e["type"] == "remote"]
    if paused:
        out["problem"] = None if not local else "advertised although the guest is paused"
    elif not entries:
        out["problem"] = "not known to FRR"
    elif remote and not local:
        out["problem"] = "FRR has it as a remote MAC at VTEP %s" % ", ".join(sorted({e["vtep"] or "?" for e in remote}))
    elif not local:
        out["problem"] = "FRR has it on another interface (%s)" % ", ".join(sorted({e["intf"] or "?" for e in entries}))
    if out["duplicate"]:
        out["problem"] = (out["problem"] + "; " if out["problem"] else "") + "FRR flags it as a duplicate MAC"
    return out
