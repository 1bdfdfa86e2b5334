"""
The two Redis connections a node keeps (Redis needs a connection of its own
for subscriptions): one for commands, one for pub/sub.

The reply parser is hiredis's (txredisapi uses it when the C{hiredis} package is
installed): txredisapi's own parser defers the rest of its buffer to the next
reactor turn after every bulk string, which made a burst of N room messages
take N reactor turns (measured: 55,000 vs 339,000 deliveries/s, bench/scale.py).

Both are txredisapi factories connected with C{factory.startConnecting(endpoint)}
(its C{ClientService} reconnects with exponential backoff).  What txredisapi
leaves to us, done here: telling the owner when each connection is up or lost
(it re-subscribes and re-registers on every reconnection), and failing
commands at once while Redis is unreachable -- txredisapi would queue them
forever -- and after C{timeout} seconds without a reply.

The owner implements C{commandsUp(protocol)}, C{subscriberUp(protocol)},
C{connectionLost(which, reason)} and C{messageReceived(channel, message)}.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


def _noDelay(transport: Any) -> None:
    # Commands and messages are small and latency-bound: Nagle would hold a PUBLISH
    # back until the previous one is acknowledged (txredisapi leaves it on).
    setNoDelay = getattr(transport, "setTcpNoDelay", None)
    if setNoDelay is not None:
        setNoDelay(True)


def _whenUsable(protocol: Any, made: Any, up: Any) -> Any:
    # txredisapi's connectionMade is an inlineCallbacks: with a password it AUTHs first
    # (and closes the connection, for good, if Redis refuses it).
    return made.addCallback(lambda _: up(protocol) if protocol._ready else None)


class _CommandProtocol(txredisapi.RedisProtocol):
    def connectionMade(self) -> Any:
        _noDelay(self.transport)
        return _whenUsable(self, super().connectionMade(), self.factory.owner._commandsUp)

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.factory.owner._lost(self, "commands", why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def connectionMade(self) -> Any:
        _noDelay(self.transport)
        return _whenUsable(self, super().connectionMade(), self.factory.owner._subscriberUp)

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.factory.owner._lost(self, "subscriber", why)

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.owner.owner.messageReceived(channel, message)


class RedisUnreachable(Exception):
    """Redis is not connected now (the connection is being re-established)."""

    def __str__(self) -> str:
        return "Redis unreachable"


class Connections:
    """
    The command and pub/sub connections to one Redis endpoint.

    @param endpoint: an L{IStreamClientEndpoint} (from C{netsvc.endpoints.clientFromString}).
    @param timeout: seconds a command may wait for its reply.
    @param backoff: (first, max) seconds between reconnection attempts.
    @param password: Redis AUTH (with C{username} for a Redis 6 ACL user); None: no AUTH.
    """

    def __init__(self, owner: Any, endpoint: Any, timeout: float, backoff: tuple[float, float] = (0.5, 10.0),
                 password: str | None = None, username: str | None = None) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.commands: _CommandProtocol | None = None
        self.subscriber: _SubscriberProtocol | None = None
        self.channels: set[str] = set()  # subscribed on the current subscriber connection
        self._commandFactory = txredisapi.RedisFactory(None, None, 1, isLazy=True, replyTimeout=timeout)
        self._commandFactory.protocol = _CommandProtocol
        self._subscriberFactory = txredisapi.SubscriberFactory(isLazy=True)
        self._subscriberFactory.protocol = _SubscriberProtocol
        for factory in (self._commandFactory, self._subscriberFactory):
            factory.owner = self
            factory.initialDelay, factory.maxDelay = backoff
            factory.password, factory.username = password, username
            factory.replyTimeout = timeout  # AUTH included
            # The "pool ready" Deferred: unused here, and failed by a refused AUTH (which _lost logs).
            factory.deferred.addErrback(lambda f: None)

    @property
    def up(self) -> bool:
        return self.commands is not None and self.subscriber is not None

    def start(self) -> None:
        if getattr(txredisapi, "hiredis", None) is None:
            log.warn("chat: hiredis is not installed; Redis replies are parsed slowly (pip install hiredis)")
        self._commandFactory.startConnecting(self.endpoint)
        self._subscriberFactory.startConnecting(self.endpoint)

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([self._commandFactory.disconnect(), self._subscriberFactory.disconnect()],
                                   consumeErrors=True)

    # -- commands

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred:
        """Run a Lua script (by its SHA after the first time); fails at once while Redis is down."""
        if self.commands is None:
            return defer.fail(RedisUnreachable())
        return self.commands.eval(script, keys, args)

    def execute(self, *command: Any) -> defer.Deferred:
        if self.commands is None:
            return defer.fail(RedisUnreachable())
        return self.commands.execute_command(*command)

    # -- subscriptions

    def subscribe(self, channel: str) -> defer.Deferred:
        """
        Subscribe (now, and again after every reconnection); fires once Redis has
        confirmed it -- or at once when already subscribed or while disconnected.
        """
        if channel in self.channels:
            return defer.succeed(None)
        self.channels.add(channel)
        if self.subscriber is None:
            return defer.succeed(None)
        d = self.subscriber.subscribe(channel)
        d.addErrback(lambda f: None)  # a lost connection re-subscribes
        return d

    def unsubscribe(self, channel: str) -> None:
        if channel not in self.channels:
            return
        self.channels.discard(channel)
        if self.subscriber is not None:
            self.subscriber.unsubscribe(channel).addErrback(lambda f: None)

    # -- connection events

    def _commandsUp(self, protocol: _CommandProtocol) -> None:
        self.commands = protocol
        if self.up:
            self.owner.connected()

    def _subscriberUp(self, protocol: _SubscriberProtocol) -> None:
        self.subscriber = protocol
        if self.channels:
            protocol.subscribe(sorted(self.channels)).addErrback(lambda f: None)
        if self.up:
            self.owner.connected()

    def _lost(self, protocol: Any, which: str, why: Any) -> None:
        if protocol is not self.commands and protocol is not self.subscriber and protocol.factory.stopped:
            log.error("chat: Redis refused this node ({which} connection): wrong or missing password "
                      "(fanout.password_file); not retrying", which=which)
        wasUp = self.up
        if which == "commands" and self.commands is protocol:
            self.commands = None
        elif which == "subscriber" and self.subscriber is protocol:
            self.subscriber = None
        else:
            return
        self.owner.disconnected(which, why, wasUp)
