"""
C{netsvc chat}: talk in a netsvc chat room from a terminal or a script.

    netsvc chat localhost:4041 --nick alice --room '#dev'
    netsvc chat localhost:4040 --framing nul            # the books' protocol
    printf 'hello\\n' | netsvc chat localhost:4041 --nick bot   # send, wait a moment, leave

Every message received is printed as a line.  Typed lines are sent as they are
(commands start with /, see /help).  At the end of standard input the client
waits --grace seconds for what is still coming, then leaves.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twisted.internet import defer, endpoints, stdio
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import LineReceiver

from netsvc import clients

FRAMING = {"line": b"\n", "nul": b"\0"}


class ChatClient(Protocol):
    """Prints each received message; C{send(text)} sends one; C{done} fires at disconnection."""

    def __init__(self, delimiter: bytes, out: Any) -> None:
        self.delimiter = delimiter
        self.out = out
        self.done: defer.Deferred = defer.Deferred()
        self._buffer = b""

    def send(self, text: bytes) -> None:
        self.transport.write(text.replace(self.delimiter, b" ") + self.delimiter)

    def dataReceived(self, data: bytes) -> None:
        *messages, self._buffer = (self._buffer + data).split(self.delimiter)
        for m in messages:
            self.out.write(m.decode("utf-8", "replace").rstrip("\r") + "\n")
        self.out.flush()

    def connectionLost(self, reason: Any) -> None:
        if self._buffer:
            self.out.write(self._buffer.decode("utf-8", "replace") + "\n")
            self.out.flush()
        self.done.callback(reason.value)


class _Keyboard(LineReceiver):
    """Standard input: each line is sent; at its end, leave after a grace period."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 16

    def __init__(self, chat: ChatClient, reactor: Any, grace: float) -> None:
        self.chat = chat
        self.reactor = reactor
        self.grace = grace

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if line:
            self.chat.send(line)

    def connectionLost(self, reason: Any) -> None:
        if self._buffer:
            self.chat.send(self._buffer)
        self.reactor.callLater(self.grace, self._leave)

    def _leave(self) -> None:
        if self.chat.transport.connected:
            self.chat.send(b"/quit")
            self.chat.transport.loseConnection()


@defer.inlineCallbacks
def chat(reactor: Any, args: argparse.Namespace, stdin: Any = None, out: Any = None) -> Any:
    out = out or sys.stdout
    endpoint = clients.streamEndpoint(reactor, args.host, args.port, args.tls, args.cacert,
                                      args.insecure, args.timeout)
    proto = ChatClient(FRAMING[args.framing], out)
    d = endpoints.connectProtocol(endpoint, proto)
    d.addTimeout(args.timeout, reactor)
    yield d
    if args.nick:
        proto.send(f"/nick {args.nick}".encode())
    if args.room:
        proto.send(f"/join {args.room}".encode())
    keyboard = _Keyboard(proto, reactor, args.grace)
    if stdin is None:
        stdio.StandardIO(keyboard, reactor=reactor)
    else:
        stdin(keyboard)
    leaving: list[bool] = []  # Ctrl-C (SIGINT) or SIGTERM is a way to leave, not a failure

    def leave() -> None:
        leaving.append(True)
        if proto.transport is not None and proto.transport.connected:
            proto.send(b"/quit")

    trigger = reactor.addSystemEventTrigger("before", "shutdown", leave)
    try:
        reason = yield proto.done
    finally:
        if not leaving:
            reactor.removeSystemEventTrigger(trigger)
    from twisted.internet.error import ConnectionDone

    if isinstance(reason, ConnectionDone) or reason is None or leaving:
        return 0
    raise reason


def run(reactor: Any, args: argparse.Namespace) -> defer.Deferred:
    status = clients.checkArguments("chat", args, 4041)
    if status is not None:
        return defer.succeed(status)
    what = clients.target(args.host, args.port, "tls" if args.tls else "tcp")
    hint = clients.TLSHint(args.host, args.cacert) if args.tls else None

    def failed(f: Any) -> int:
        return clients.fail("chat", what, clients.describe(f.value, args.timeout, hint))

    return chat(reactor, args).addErrback(failed)


def addParser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("chat", help="chat in a netsvc chat room",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("address", metavar="HOST:PORT", help="the server (default port 4041)")
    p.add_argument("--nick", metavar="NAME", help="nickname to take on arrival")
    p.add_argument("--room", metavar="ROOM", help="room to join on arrival (e.g. '#dev')")
    p.add_argument("--framing", choices=sorted(FRAMING), default="line",
                   help="line (default) or nul (the books' protocol)")
    p.add_argument("--grace", type=float, default=1.0, metavar="SECONDS",
                   help="seconds to keep listening after the end of input (default 1)")
    clients.addConnectionOptions(p)
    p.set_defaults(run=run, untilInterrupted=True)
    return p
