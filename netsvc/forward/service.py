"""
C{services.forward}: settings -> listeners, one L{RuleRuntime} per rule.

Reload (SIGHUP, through L{ForwardService.reconfigure}): rules are matched by
name.  A rule whose listeners are unchanged keeps its sockets and takes the new
settings for new connections; changed, added and removed rules have their
listeners closed or opened.  Connections already open are never dropped: each
keeps the rule it started with.  Backends keep their health state while a
rule's C{connect:} list is unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet import defer
from twisted.logger import Logger

from netsvc.config import ConfigError
from netsvc.endpoints import isDatagram
from netsvc.forward import direct
from netsvc.forward.rule import RuleFactory, RuleRuntime, raiseFileLimit
from netsvc.forward.settings import Settings
from netsvc.forward.udp import UDPForwarder
from netsvc.policies import AccessList
from netsvc.runtime import ListenerService, ServerService
from netsvc.tls import halfClosing

__all__ = ["Settings", "makeService", "ForwardService"]

log = Logger(namespace="netsvc.forward")


class _RuleListener(ListenerService):
    """A rule's stream listener: a plain TCP port hands its sockets to direct relays."""

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        direct.adoptPort(self.port, self.target)


class _RuleListeners:
    """The listeners of one rule and what they dispatch to (factories or UDP forwarders)."""

    def __init__(self) -> None:
        self.services: list[ListenerService] = []
        self.targets: list[Any] = []  # RuleFactory (inside the guard's wrapper) or UDPForwarder
        self.endpoints: list[tuple[str, bool]] = []


class ForwardService(ServerService):
    def __init__(self, settings: Settings, context: Any) -> None:
        super().__init__("forward", settings, context)
        self.rules: dict[str, RuleRuntime] = {}
        self.ruleListeners: dict[str, _RuleListeners] = {}
        for index, rule in enumerate(settings.rules):
            runtime = RuleRuntime(rule, context.reactor, context.metrics)
            self.rules[rule.name] = runtime
            group = self.ruleListeners[rule.name] = self._listen(index, runtime)
            self._attach(group)

    # -- building

    def _listen(self, index: int, runtime: RuleRuntime) -> _RuleListeners:
        rule = runtime.settings
        out = _RuleListeners()
        for i, listener in enumerate(rule.listen):
            acceptProxy = rule.accept_proxy if listener.accept_proxy is None else listener.accept_proxy
            if isDatagram(listener.endpoint):
                target: Any = UDPForwarder(runtime, self.guard)
                wrapped = target
            else:
                target = wrapped = RuleFactory(runtime, acceptProxy, self.guard)
            svc = (ListenerService if isinstance(target, UDPForwarder) else _RuleListener)(
                self.context, listener.endpoint, f"{self.keyPath}.rules[{index}].listen[{i}]", wrapped
            )
            svc.endpoint = halfClosing(svc.endpoint)  # TLS clients may close_notify, then read
            out.services.append(svc)
            out.targets.append(target)
            out.endpoints.append((listener.endpoint, acceptProxy))
        return out

    def _attach(self, group: _RuleListeners) -> None:
        for svc in group.services:
            svc.setServiceParent(self)  # binds now if we are running
            self.listeners.append(svc)

    def _detach(self, group: _RuleListeners) -> defer.Deferred:
        ds = []
        for svc, target in zip(group.services, group.targets):
            if svc in self.listeners:
                self.listeners.remove(svc)
            if svc.parent is not None:
                ds.append(defer.maybeDeferred(svc.disownServiceParent))
            if isinstance(target, UDPForwarder):
                target.stop()
        return defer.gatherResults(ds)

    def startService(self) -> None:
        super().startService()
        for runtime in self.rules.values():
            runtime.start()

    def stopService(self) -> defer.Deferred:
        for runtime in self.rules.values():
            runtime.stop()
        for group in self.ruleListeners.values():
            for target in group.targets:
                if isinstance(target, UDPForwarder):
                    target.stop()
        return super().stopService()

    # -- reload

    def reconfigure(self, settings: Settings) -> None:
        """New settings (SIGHUP): see the module docstring."""
        # The service-wide limits and access lists (what ServerService.reconfigure does;
        # its listen: check does not apply: our listeners are per rule, handled below).
        self.guard.reconfigure(settings.limits, AccessList(settings.allow, settings.deny))
        self.settings = settings
        old = self.rules
        self.rules = {}
        changes = []
        for index, rule in enumerate(settings.rules):
            previous = old.pop(rule.name, None)
            pool = None
            if previous is not None and list(previous.settings.connect) == list(rule.connect):
                pool = previous.pool
                pool.balance = rule.balance
            runtime = RuleRuntime(rule, self.context.reactor, self.context.metrics, pool=pool)
            if previous is not None:
                runtime.connections = previous.connections  # max_connections counts them all
                previous.stop()
            self.rules[rule.name] = runtime
            wanted = [
                (l.endpoint, rule.accept_proxy if l.accept_proxy is None else l.accept_proxy)
                for l in rule.listen
            ]
            group = self.ruleListeners.get(rule.name)
            if group is not None and [e for e, _ in group.endpoints] == [e for e, _ in wanted]:
                for target, (_, acceptProxy) in zip(group.targets, wanted):
                    target.rule = runtime
                    if isinstance(target, RuleFactory):
                        target.acceptProxy = acceptProxy
                group.endpoints = wanted
                changes.append(f"{rule.name}: updated" if previous is not None else f"{rule.name}: added")
            else:
                if group is not None:
                    self._detach(group)
                group = self._listen(index, runtime)
                try:
                    if self.running:
                        self._attach(group)
                except ConfigError as e:
                    for line in str(e).splitlines():
                        log.error("reload: {problem}", problem=line)
                    self._detach(group)
                    group = _RuleListeners()
                self.ruleListeners[rule.name] = group
                changes.append(f"{rule.name}: listeners {'re' if previous else ''}opened")
            if self.running:
                runtime.start()
        for name, gone in old.items():
            gone.stop()
            group = self.ruleListeners.pop(name, None)
            if group is not None:
                self._detach(group)
            changes.append(f"{name}: removed")
        log.info(
            "forward: reloaded ({changes}); open connections keep their rules",
            changes="; ".join(changes) or "no rules",
        )
        writeStatus = getattr(self.parent, "writeStatus", None)
        if writeStatus is not None:
            try:
                writeStatus()
            except OSError:
                pass


def makeService(settings: Settings, context: Any) -> IService:
    raiseFileLimit()
    return ForwardService(settings, context)
