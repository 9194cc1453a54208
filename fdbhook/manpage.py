"""fdbhook(8) and the bash completion, generated from the argparse parser that ``--help`` prints.

One source: every subcommand, argument and option and its help text comes
from ``fdbhook.cli.build_parser``; only the sections argparse has no place
for (files, environment, exit codes, journal fields, metrics) are written
here. install.sh renders both at install time.
"""

import argparse
import datetime

from fdbhook.logsetup import MESSAGE_IDS

ENVIRONMENT = (
    ("FDBHOOK_CONF", "the config file (default /etc/fdbhook/fdbhook.conf)"),
    ("FDBHOOK_STATE_DIR", "records of managed ports (default /run/fdbhook)"),
    ("FDBHOOK_SOCKET", "fdbhookd's hook socket (default /run/fdbhook/fdbhookd.sock)"),
    ("FDBHOOK_NO_DAEMON", "1: the hook never asks fdbhookd"),
    ("FDBHOOK_LOG", "append log lines to this file instead of the journal or syslog"),
    ("FDBHOOK_LIBVIRT_NETWORK_DIRS", "where to read libvirt network XML "
                                     "(default /run/libvirt/network:/etc/libvirt/qemu/networks)"),
)
FILES = (
    ("/etc/fdbhook/fdbhook.conf", "INI configuration: [manage], [hook], [daemon], [metrics], "
                                  "[bridge NAME], [network NAME]"),
    ("/etc/libvirt/hooks/qemu, lxc, network", "the hooks libvirt runs"),
    ("/run/fdbhook", "per-domain records and fdbhookd.sock"),
    ("/etc/systemd/system/fdbhookd.service", "the daemon's unit (Type=notify, ordered before libvirtd)"),
    ("/var/lib/prometheus/node-exporter/fdbhook.prom", "fdbhookd's metrics for node_exporter's textfile "
                                                       "collector"),
)
EXIT_CODES = (
    ("0", "ok"),
    ("1", "a managed NIC could not be managed"),
    ("2", "bad usage, config or XML"),
    ("3", "libvirt unreachable"),
    ("4", "status found drift"),
)
METRICS = (
    "fdbhook_managed_ports{bridge}", "fdbhook_fdb_entries{bridge}", "fdbhook_uplink_promiscuity{bridge,port}",
    "fdbhook_hook_calls_total{driver,operation,outcome}", "fdbhook_hook_duration_seconds{driver,operation}",
    "fdbhook_drift_found_total", "fdbhook_drift_repaired_total", "fdbhook_mac_changes_total",
    "fdbhook_resyncs_total", "fdbhook_last_resync_timestamp_seconds", "fdbhook_managed_domains",
)
JOURNAL_FIELDS = "FDBHOOK_DRIVER FDBHOOK_DOMAIN FDBHOOK_NIC FDBHOOK_MAC FDBHOOK_PORT FDBHOOK_BRIDGE " \
                 "FDBHOOK_ACTION FDBHOOK_RESULT MESSAGE_ID"


def _esc(text):
    """roff-safe text: backslashes, leading dots and quotes, hyphens as minus signs."""
    text = (text or "").replace("\\", "\\e").replace("-", "\\-")
    if text[:1] in (".", "'"):
        text = "\\&" + text
    return text


def _subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return []


def _synopsis(parser):
    usage = " ".join(parser.format_usage().split())  # one line, whatever the terminal's width
    return usage[len("usage: "):] if usage.startswith("usage: ") else usage


def _options(parser):
    """(term, help) for every positional and option of ``parser``."""
    out = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            term = ", ".join(action.option_strings)
            if action.nargs != 0:
                term += " " + (action.metavar or action.dest.upper())
        else:
            term = action.metavar or action.dest
            if action.choices:
                term = "|".join(action.choices)
        text = action.help or ""
        if action.choices and action.option_strings:
            text += " (%s)" % ", ".join(action.choices)
        out.append((term, text))
    return out


def _tp(lines, term, text, bold=True):
    lines.extend([".TP", ("\\fB%s\\fR" if bold else "%s") % _esc(term), _esc(text)])


def render_manpage(parser, version="", date=None):
    """The roff source of fdbhook(8)."""
    date = date or datetime.date.today().isoformat()
    lines = ['.TH FDBHOOK 8 "%s" "fdbhook %s" "System Administration"' % (date, _esc(version)),
             ".SH NAME", "fdbhook \\- %s" % _esc(parser.description or ""),
             ".SH SYNOPSIS", ".B fdbhook", _esc(_synopsis(parser)[len("fdbhook "):]),
             ".SH DESCRIPTION",
             _esc("fdbhook runs as libvirt's qemu, lxc and network hooks and as the daemon fdbhookd. For every "
                  "guest NIC on a managed bridge it adds a static FDB entry for the NIC's MAC and turns "
                  "learning and unicast flooding off on its port, and undoes it when the guest stops."),
             ".SH OPTIONS"]
    for term, text in _options(parser):
        _tp(lines, term, text)
    lines.append(".SH COMMANDS")
    for name, sub, text in _subcommands(parser):
        lines.extend([".SS %s" % _esc(name), _esc(text), ".PP", ".B fdbhook",
                      _esc(_synopsis(sub)[len("fdbhook "):])])
        for term, help_text in _options(sub):
            _tp(lines, term, help_text)
    lines.append(".SH EXIT STATUS")
    for code, text in EXIT_CODES:
        _tp(lines, code, text)
    lines.append(".SH ENVIRONMENT")
    for name, text in ENVIRONMENT:
        _tp(lines, name, text)
    lines.append(".SH FILES")
    for name, text in FILES:
        _tp(lines, name, text)
    lines.extend([".SH JOURNAL",
                  _esc("Where journald runs, each per-NIC line carries the fields %s; MESSAGE_ID is fixed per "
                       "result:" % JOURNAL_FIELDS)])
    for status, mid in MESSAGE_IDS.items():
        _tp(lines, status, mid)
    lines.extend([".PP", _esc("Example: journalctl FDBHOOK_DOMAIN=web1"), ".SH METRICS",
                  _esc("fdbhookd writes Prometheus text to [metrics] textfile (and serves it on [metrics] "
                       "listen, off by default):")])
    for name in METRICS:
        lines.extend([".IP", _esc(name)])
    lines.extend([".SH SEE ALSO", "\\fBvirsh\\fR(1), \\fBbridge\\fR(8), \\fBsystemd.unit\\fR(5)", ""])
    return "\n".join(lines)


def render_completion(parser):
    """A bash completion script: subcommands and their options from the parser, domain names from virsh.

    Domain names come from ``virsh list --all --name`` in the admin's shell
    (never from a hook); hook drivers and operations are completed too.
    """
    subs = _subcommands(parser)
    cases = []
    for name, sub, _ in subs:
        opts = " ".join(o for a in sub._actions for o in a.option_strings)
        positional = [a for a in sub._actions if not a.option_strings]
        choices = " ".join(positional[0].choices) if positional and positional[0].choices else ""
        kind = {"apply": "domain", "teardown": "domain", "explain": "bridge", "replay": "file"}.get(name, "")
        cases.append("        %s) opts=%s; choices=%s; kind=%s ;;" % (name, _sh(opts), _sh(choices), kind or '""'))
    top = " ".join(o for a in parser._actions for o in a.option_strings)
    return _COMPLETION % {"subs": " ".join(name for name, _, _ in subs), "top": top, "cases": "\n".join(cases)}


def _sh(text):
    return "'%s'" % text.replace("'", "'\\''")


_COMPLETION = r"""# bash completion for fdbhook(8), generated by `fdbhook completion` from its argparse parser.
_fdbhook_domains() {
    command -v virsh >/dev/null 2>&1 || return 0
    virsh -q list --all --name 2>/dev/null
}
_fdbhook() {
    local cur prev sub="" i opts choices kind
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            -c|--config) ((i++)) ;;
            -*) ;;
            *) sub=${COMP_WORDS[i]}; break ;;
        esac
    done
    case $prev in
        -c|--config|--xml|--socket) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --driver) COMPREPLY=($(compgen -W "qemu lxc" -- "$cur")); return ;;
    esac
    if [ -z "$sub" ]; then
        COMPREPLY=($(compgen -W "%(subs)s %(top)s" -- "$cur"))
        return
    fi
    case $sub in
%(cases)s
        *) return ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [ "$sub" = hook ] && [ "$prev" = hook ]; then
        COMPREPLY=($(compgen -W "$choices" -- "$cur"))
    elif [ "$kind" = domain ]; then
        local IFS=$'\n'
        COMPREPLY=($(compgen -W "$(_fdbhook_domains)" -- "$cur"))
    elif [ "$kind" = bridge ]; then
        COMPREPLY=($(compgen -W "$(ls /sys/class/net/*/bridge -d 2>/dev/null | cut -d/ -f5)" -- "$cur"))
    elif [ "$kind" = file ]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    fi
}
complete -F _fdbhook fdbhook
"""
