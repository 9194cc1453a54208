"""The ``fdbhook`` command. Maps fdbhook errors to exit codes, never tracebacks.

Exit codes: 0 ok, 1 a managed NIC could not be managed, 2 bad usage, config
or XML, 3 libvirt unreachable, 4 ``status`` found drift, 5 ``status`` found
no drift but a bad config (the last good one in use) or a quarantined record.
"""

import argparse
import json
import sys

from fdbhook.errors import FdbhookError, UsageError

EXIT_DRIFT = 4
EXIT_DAMAGED = 5


def _say(text, file=None):
    """print(), with control characters from names (a tenant's domain XML) escaped on every line."""
    from fdbhook.logsetup import escape_controls

    print("\n".join(escape_controls(line) for line in str(text).split("\n")), file=file)


def hook_main(driver, argv, stdin=None, verbose=False, capture=True):
    """``fdbhook hook``: read stdin once and serve the hook in this process (no daemon)."""
    from fdbhook.client import read_stdin
    from fdbhook.hook import answer

    return answer(driver, argv, read_stdin(stdin if stdin is not None else sys.stdin.buffer),
                  verbose=verbose, capture=capture)


def _domain_xml(args):
    """XML bytes from --xml FILE ('-' = stdin) or from libvirt by name."""
    if args.xml:
        if args.xml == "-":
            return sys.stdin.buffer.read()
        try:
            with open(args.xml, "rb") as handle:
                return handle.read()
        except OSError as exc:
            raise UsageError(reason="%s: %s" % (args.xml, exc.strerror)) from None
    if not args.domain:
        raise UsageError(reason="name a domain or give --xml FILE")
    from fdbhook.virt import domain_xml

    return domain_xml(args.connect, args.domain)


def _print_report(report, dry_run):
    from fdbhook.plan import render

    for res in report.results:
        d = res.decision
        where = "%s on %s" % (d.port or "-", d.bridge or "-")
        _say("%s/%s %s %s: %s: %s" % (report.driver, report.domain, d.nic.label, where, res.status,
                                        res.message))
        if dry_run:
            for op in res.ops:
                print("    " + render(op))
    if not report.results:
        _say("%s/%s: nothing to do" % (report.driver, report.domain))


def cmd_apply(args):
    from fdbhook.config import load_config
    from fdbhook.domxml import parse_domain
    from fdbhook.engine import apply_domain
    from fdbhook.kernel import Kernel
    from fdbhook.state import Store

    config = load_config(args.config)
    domain = parse_domain(_domain_xml(args), driver=args.driver, what=args.domain or args.xml)
    with Kernel() as kernel:
        report = apply_domain(domain, config, kernel, Store(config.state_dir), dry_run=args.dry_run)
    _print_report(report, args.dry_run)
    if report.failures:
        _say("fdbhook: " + report.one_line(), file=sys.stderr)
        return 1
    return 0


def cmd_teardown(args):
    from fdbhook.config import load_config
    from fdbhook.engine import teardown_domain
    from fdbhook.kernel import Kernel
    from fdbhook.state import Store

    config = load_config(args.config)
    if args.xml:
        from fdbhook.domxml import parse_domain
        domain = parse_domain(_domain_xml(args), driver=args.driver, what=args.xml)
        driver, name = domain.driver, domain.name
    elif args.domain:
        driver, name = args.driver or "qemu", args.domain
    else:
        raise UsageError(reason="name a domain or give --xml FILE")
    with Kernel() as kernel:
        report = teardown_domain(driver, name, kernel, Store(config.state_dir), dry_run=args.dry_run)
    _print_report(report, args.dry_run)
    return 1 if report.failures else 0


def _need_root(command):
    """One line and exit 2 for a non-root user: records, logs and the socket are root's alone."""
    import os

    if os.geteuid() != 0:
        raise UsageError(reason="%s needs root (fdbhook's records and bridge state are root's only)" % command)


def status_config(path):
    """The config status reports on: the file, else the last good one, else "nothing" (never raises)."""
    import os

    from fdbhook.config import Config, _env_overrides, load_config_or_last_good
    from fdbhook.errors import ConfigError

    try:
        return load_config_or_last_good(path)
    except ConfigError as exc:
        return Config(path=path or os.environ.get("FDBHOOK_CONF") or Config.path, exists=False,
                      fallback="%s; no good config was ever saved: nothing is managed" % exc,
                      **_env_overrides(os.environ))


def cmd_status(args):
    _need_root("status")
    from fdbhook.kernel import Kernel
    from fdbhook.state import Store
    from fdbhook.status import collect, render_text

    from fdbhook.evpn import read_macs

    config = status_config(args.config)
    store = Store(config.state_dir)
    with Kernel() as kernel:
        from fdbhook.txn import needs_recovery, recover
        if needs_recovery(store):
            with store.lock():
                recover(kernel, store)  # an interrupted operation is finished or undone before it is shown
        data = collect(config, kernel, store, frr=read_macs)
        if not data["stale_records"] and not any(p["domain"] for b in data["bridges"] for p in b["ports"]):
            # Nothing managed yet: what a new user needs to know and do next.
            from fdbhook import firstrun
            data["first_run"] = firstrun.sentences(firstrun.gather(config, kernel.links()))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        _say(render_text(data))
    if data["drift"]:
        return EXIT_DRIFT
    return EXIT_DAMAGED if data["config_fallback"] or data["quarantined"] or data["daemon"].get("config_fallback") \
        else 0


def cmd_explain(args):
    from fdbhook.config import load_config
    from fdbhook.kernel import Kernel
    from fdbhook.state import Store
    from fdbhook.status import explain, render_explain

    config = load_config(args.config)
    with Kernel() as kernel:
        bridge = explain(config, kernel, Store(config.state_dir), args.bridge)
    if bridge is None:
        raise UsageError(reason="%s is not a Linux bridge here" % args.bridge)
    _say(json.dumps(bridge, indent=2, sort_keys=True) if args.json else render_explain(bridge))
    return 0


def cmd_hook(args):
    return hook_main(args.driver, args.argv, verbose=args.verbose)


def cmd_replay(args):
    """Re-run one captured hook invocation with the same semantics."""
    import io

    from fdbhook.capture import load

    driver, argv, data = load(args.file)
    print("replaying: %s %s (%d bytes of stdin)" % (driver, " ".join(argv), len(data)), file=sys.stderr)
    # A replay is not captured again: the spool keeps what libvirt sent.
    code = hook_main(driver, argv, stdin=io.BytesIO(data), verbose=args.verbose, capture=False)
    print("exit %d" % code, file=sys.stderr)
    return code


def cmd_daemon(args):
    from fdbhook.daemon import DEFAULT_URIS, Daemon

    daemon = Daemon(config_path=args.config, socket_path=args.socket,
                    uris=args.uri or DEFAULT_URIS, use_libvirt=not args.no_libvirt)
    return daemon.run_forever()


def cmd_demo(args):
    from fdbhook.demo import run_demo

    return run_demo(frames=args.frames)


def cmd_manpage(args):
    import datetime
    import os

    from fdbhook import __version__
    from fdbhook.manpage import render_manpage

    # SOURCE_DATE_EPOCH (reproducible builds): the same source renders the same page.
    stamp = os.environ.get("SOURCE_DATE_EPOCH")
    date = datetime.datetime.utcfromtimestamp(int(stamp)).date().isoformat() if stamp and stamp.isdigit() else None
    sys.stdout.write(render_manpage(build_parser(), version=__version__, date=date))
    return 0


def cmd_completion(args):
    from fdbhook.manpage import render_completion

    sys.stdout.write(render_completion(build_parser()))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="fdbhook", description="Static FDB management for libvirt guests "
                                     "on Linux bridges.")
    parser.add_argument("-c", "--config", help="config file (default $FDBHOOK_CONF or /etc/fdbhook/fdbhook.conf)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr, debug level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("hook", help="run a libvirt hook (stdin: the XML); also the manual replay path")
    p.add_argument("driver", choices=("qemu", "lxc", "network"), help="the libvirt hook being run")
    p.add_argument("argv", nargs="+", metavar="ARG", help="OBJECT OP SUBOP EXTRA, as libvirt passes them")
    p.set_defaults(func=cmd_hook)

    for name, func, text in (("apply", cmd_apply, "manage the NICs of a domain"),
                             ("teardown", cmd_teardown, "undo what was applied to a domain")):
        p = sub.add_parser(name, help=text)
        p.add_argument("domain", nargs="?", help="domain name (looked up in libvirt for apply)")
        p.add_argument("--xml", metavar="FILE", help="domain XML file ('-' for stdin) instead of libvirt")
        p.add_argument("--driver", choices=("qemu", "lxc"), help="default: from the XML's domain type")
        p.add_argument("--connect", default=None, help="libvirt URI (default: libvirt's default)")
        p.add_argument("--dry-run", action="store_true", help="print the plan as bridge(8) commands")
        p.set_defaults(func=func)

    p = sub.add_parser("explain", help="which ports still learn or flood, and can the uplink be non-promiscuous")
    p.add_argument("bridge")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("replay", help="re-run a hook invocation captured with [hook] capture = yes")
    p.add_argument("file", help="a .json file from the capture spool")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("status", help="managed bridges and ports, drift, and why the uplink is promiscuous")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("daemon", help="run fdbhookd in the foreground (hotplug, pause/resume, drift, fast hooks)")
    p.add_argument("--socket", help="hook socket (default $FDBHOOK_SOCKET or /run/fdbhook/fdbhookd.sock)")
    p.add_argument("--uri", action="append", help="libvirt URI to watch (repeatable; default qemu and lxc system)")
    p.add_argument("--no-libvirt", action="store_true", help="hooks and drift repair only, no libvirt events")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("demo", help="show the effect in a throwaway network namespace (root)")
    p.add_argument("--frames", type=int, default=20, help="unknown-unicast frames sent per phase")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("manpage", help="print fdbhook(8) in roff, generated from this --help (install.sh uses it)")
    p.set_defaults(func=cmd_manpage)
    p = sub.add_parser("completion", help="print the bash completion script (subcommands, options, domain names)")
    p.set_defaults(func=cmd_completion)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command != "hook":
        from fdbhook.logsetup import setup_logging
        setup_logging(verbose=args.verbose)
    if args.config and args.command == "hook":
        import os
        os.environ["FDBHOOK_CONF"] = args.config
    try:
        return args.func(args)
    except FdbhookError as exc:
        _say("fdbhook: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
