"""
C{netsvc forward}: one ad-hoc forwarding rule in the foreground (socat-like),
with the same options as a C{services.forward.rules[]} entry.

    netsvc forward 8080 10.0.0.5:80                          # tcp:8080 on 127.0.0.1
    netsvc forward tcp:8080:interface=0.0.0.0 a:80 b:80 --balance leastconn --health-interval 2s
    netsvc forward 8443 tls:host=example.org:port=443        # TLS out, verified, with SNI
    netsvc forward udp:5300:interface=127.0.0.1 udp:host=9.9.9.9:port=53 --udp-responses 1
    netsvc forward 2525 127.0.0.1:25 --send-proxy v2 --allow 10.0.0.0/8

LISTEN is a server endpoint string, or a bare PORT (loopback) or ADDR:PORT.
CONNECT is a client endpoint string (tcp:, tls:, unix:, udp:) or HOST:PORT.
Runs until interrupted (Ctrl-C, SIGTERM); one log line per closed connection.
Exit status: 0 after an interrupt, 1 when it cannot listen, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)$")


def listenEndpoint(text: str) -> str:
    """C{8080} -> C{tcp:8080:interface=127.0.0.1}; C{ADDR:PORT} -> C{tcp:PORT:interface=ADDR}; else as is."""
    if text.isdigit():
        return f"tcp:{text}:interface=127.0.0.1"
    m = _HOSTPORT.match(text)
    if m and not text.startswith(("tcp:", "udp:", "tls:", "ssl:", "unix:")):
        host = m.group("v6") or m.group("host")
        kind = "tcp6" if m.group("v6") else "tcp"
        return f"{kind}:{m.group('port')}:interface={host}"
    return text


def connectEndpoint(text: str, datagram: bool) -> str:
    """C{HOST:PORT} / C{[V6]:PORT} -> C{tcp:host=..:port=..} (C{udp:} for a UDP listener); else as is."""
    m = _HOSTPORT.match(text)
    if m and not text.startswith(("tcp:", "udp:", "tls:", "ssl:", "unix:")):
        host = m.group("v6") or m.group("host")
        host = f"[{host}]" if m.group("v6") else host
        return f"{'udp' if datagram else 'tcp'}:host={host}:port={m.group('port')}"
    return text


def ruleFromArgs(args: argparse.Namespace) -> dict[str, Any]:
    """The C{rules[]} entry (plain YAML-like data) the command line describes."""
    listen = listenEndpoint(args.listen)
    datagram = listen.startswith("udp:")
    rule: dict[str, Any] = {
        "name": args.name,
        "listen": [listen],
        "connect": [connectEndpoint(c, datagram) for c in args.connect],
        "balance": args.balance,
    }
    for key in ("connect_timeout", "idle_timeout", "max_connections", "send_proxy"):
        value = getattr(args, key)
        if value is not None:
            rule[key] = value
    if args.accept_proxy:
        rule["accept_proxy"] = True
    if args.trusted_proxies:
        rule["trusted_proxies"] = args.trusted_proxies
    if args.allow:
        rule["allow"] = args.allow
    if args.deny:
        rule["deny"] = args.deny
    if args.bandwidth or args.rule_bandwidth:
        rule["bandwidth"] = {
            k: v for k, v in (("per_connection", args.bandwidth), ("per_rule", args.rule_bandwidth)) if v
        }
    health = {
        k: v
        for k, v in (
            ("interval", args.health_interval),
            ("timeout", args.health_timeout),
            ("fall", args.health_fall),
            ("rise", args.health_rise),
            ("send", args.health_send),
            ("expect", args.health_expect),
        )
        if v is not None
    }
    if health:
        rule["health"] = health
    udp = {
        k: v
        for k, v in (
            ("idle_timeout", args.udp_idle_timeout),
            ("max_associations", args.udp_max_associations),
            ("responses", args.udp_responses),
        )
        if v is not None
    }
    if udp:
        rule["udp"] = udp
    return rule


def run(reactor: Any, args: argparse.Namespace) -> Any:
    from twisted.internet import defer
    from twisted.logger import globalLogBeginner

    from netsvc import logs
    from netsvc.config import ConfigError, LogSettings, Settings, structure
    from netsvc.runtime import buildDaemon

    data = {
        "state_dir": args.state_dir,
        "drain_timeout": 0,
        "log": {"format": args.log_format, "level": "warn" if args.quiet else "info"},
        "services": {"forward": {"rules": [ruleFromArgs(args)]}},
    }
    try:
        settings = structure(Settings, data, "command line")
        import os

        import attrs

        settings = attrs.evolve(settings, base_dir=os.getcwd())
        daemon = buildDaemon(settings, reactor, configFile="command line")
        daemon.writesStatus = False  # var/status.json is make run's, not this foreground rule's
        observer = logs.observerFor(structure(LogSettings, data["log"]), sys.stderr)
        daemon.privilegedStartService()
    except ConfigError as e:
        for line in str(e).replace("command line: ", "").replace("services.forward.rules[0].", "").splitlines():
            sys.stderr.write(f"netsvc forward: {line}\n")
        return defer.succeed(1 if "cannot listen" in str(e) else 2)
    # Logging starts once listening works: a refused start is one line, not Twisted's "Main loop terminated".
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    daemon.startService()
    svc = daemon.getServiceNamed("forward")
    for listener in daemon.listeners:
        a = listener.address
        where = f"{a.get('host')}:{a.get('port')}" if "port" in a else a.get("path")
        sys.stderr.write(
            f"netsvc forward: {a['type'].lower()} {where} -> "
            f"{', '.join(b.label for b in svc.rules[args.name].pool.backends)}\n"
        )
    done: defer.Deferred = defer.Deferred()

    def stop() -> defer.Deferred:
        return defer.maybeDeferred(daemon.stopService).addBoth(
            lambda _: done.callback(0) if not done.called else None
        )

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    return done


def addParser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "forward",
        help="forward a port (one ad-hoc rule, in the foreground)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("listen", metavar="LISTEN", help="endpoint string, PORT (loopback) or ADDR:PORT")
    p.add_argument("connect", nargs="+", metavar="CONNECT", help="backend endpoint string or HOST:PORT")
    p.add_argument("--name", default="cli", help="rule name in logs and metrics (default cli)")
    p.add_argument("--balance", default="roundrobin", choices=["roundrobin", "first", "leastconn", "random"],
                   help="how backends are chosen (default roundrobin); a failed connect tries the next")
    p.add_argument("--connect-timeout", dest="connect_timeout", metavar="DURATION",
                   help="give up on a backend after this long (default 5s)")
    p.add_argument("--idle-timeout", dest="idle_timeout", metavar="DURATION",
                   help="close a connection with no traffic either way for this long (default 10m; 0: never)")
    p.add_argument("--max-connections", dest="max_connections", type=int, metavar="N",
                   help="open connections at most (more are closed at once)")
    p.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="accept only these clients (repeatable; default everyone)")
    p.add_argument("--deny", action="append", default=[], metavar="CIDR",
                   help="refuse these clients (repeatable; deny wins over allow)")
    p.add_argument("--bandwidth", metavar="SIZE", help="bytes/s per connection and direction (e.g. 1MiB)")
    p.add_argument("--rule-bandwidth", dest="rule_bandwidth", metavar="SIZE", help="bytes/s for the rule")
    p.add_argument("--send-proxy", dest="send_proxy", choices=["v1", "v2"],
                   help="send a PROXY protocol header (HAProxy's v1 text or v2 binary) to the backend")
    p.add_argument("--accept-proxy", dest="accept_proxy", action="store_true",
                   help="expect a PROXY protocol header (v1 or v2) from a load balancer in front "
                        "(needs --trusted-proxy)")
    p.add_argument("--trusted-proxy", dest="trusted_proxies", action="append", default=[], metavar="CIDR",
                   help="with --accept-proxy: who may send the header (repeatable; anyone else is refused)")
    p.add_argument("--health-interval", dest="health_interval", metavar="DURATION",
                   help="check each backend this often (off unless given)")
    p.add_argument("--health-timeout", dest="health_timeout", metavar="DURATION",
                   help="a check slower than this fails")
    p.add_argument("--health-fall", dest="health_fall", type=int, metavar="N",
                   help="failed checks in a row that mark a backend down")
    p.add_argument("--health-rise", dest="health_rise", type=int, metavar="N",
                   help="good checks in a row that mark it up again")
    p.add_argument("--health-send", dest="health_send", metavar="TEXT", help="what a check sends")
    p.add_argument("--health-expect", dest="health_expect", metavar="TEXT",
                   help="what a check's answer must contain")
    p.add_argument("--udp-idle-timeout", dest="udp_idle_timeout", metavar="DURATION",
                   help="UDP: forget a client's association after this long without traffic")
    p.add_argument("--udp-max-associations", dest="udp_max_associations", type=int, metavar="N",
                   help="UDP: clients served at once (more are dropped)")
    p.add_argument("--udp-responses", dest="udp_responses", type=int, metavar="N",
                   help="UDP: close an association after N answers (1 for DNS)")
    p.add_argument(
        "--state-dir", dest="state_dir", default="var", help="for a tls:PORT listener's certificate"
    )
    p.add_argument("--log-format", dest="log_format", default="text", choices=["text", "json"],
                   help="log lines on stderr as text (default) or JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="log only warnings and errors")
    p.set_defaults(run=run, logsItself=True, untilInterrupted=True)
    return p
