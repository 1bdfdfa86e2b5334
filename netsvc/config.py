"""
YAML configuration -> typed, validated settings.

Every setting is an attrs class; the YAML mapping is structured into it by
L{structure}, which walks the attrs fields and their type annotations.  All
problems in a file are collected, each naming the file, the key path and the
reason, so that C{netsvc check-config} can print them all, one per line.

Why not cattrs: its errors are exception groups meant for programmers; ours are
the user interface ("did you mean ...?", sizes as C{64KiB}, durations as C{5m}).

Supported field types: C{bool}, C{int}, C{float}, C{str}, C{Literal[...]},
C{list[T]}, C{dict[str, T]}, C{T | None}, nested attrs classes, and any class with
a C{fromConfig(value, path, walker) -> instance} classmethod that raises
L{Invalid} (or records problems on the walker and returns L{attrs.NOTHING}).
Field metadata C{min}/C{max} bound numbers.

Layering: this module sits above L{netsvc.endpoints} (listener validation) and
L{netsvc.policies} (L{Limits}, access lists), which sit above L{netsvc.schema}
(field, frozen, Duration, Size and the error types, all re-exported here).
Nothing below imports this module.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

# Limits and the schema names are re-exported: services write their settings with them, imported from here.
from netsvc import endpoints
from netsvc.policies import Limits, networkProblems
from netsvc.schema import ConfigError, Duration, Invalid, Problem, Size, field, frozen, suggest  # noqa: F401
from netsvc.workers.settings import CPUAffinity, WorkerCount, checkWorkers

# -- the structuring engine --------------------------------------------------


class _Walker:
    """Structures YAML data into settings classes, collecting problems."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(Problem(self.file, path, reason))

    def structure(self, tp: Any, value: object, path: str) -> Any:
        """
        Convert C{value} to C{tp}; on failure record a problem and return
        L{attrs.NOTHING}.
        """
        try:
            return self._structure(tp, value, path)
        except Invalid as e:
            self.problem(path, str(e))
            return attrs.NOTHING

    def _structure(self, tp: Any, value: object, path: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = [a for a in args if a is not type(None)]
            return self._structure(inner, value, path)
        if origin is Literal:
            if value is False and "off" in args:
                value = "off"  # YAML 1.1 (pyyaml) reads an unquoted off as false
            if value not in args:
                choices = ", ".join(repr(a) for a in args)
                raise Invalid(f"expected one of {choices}, got {value!r}{suggest(str(value), map(str, args))}")
            return value
        if origin is list:
            if not isinstance(value, list):
                raise Invalid(f"expected a list, got {_kind(value)}")
            items = [self.structure(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
            return [i for i in items if i is not attrs.NOTHING]
        if origin is dict:
            if not isinstance(value, dict):
                raise Invalid(f"expected a mapping, got {_kind(value)}")
            out = {str(k): self.structure(args[1], v, _join(path, str(k))) for k, v in value.items()}
            return {k: v for k, v in out.items() if v is not attrs.NOTHING}
        if hasattr(tp, "fromConfig"):
            return tp.fromConfig(value, path, self)
        if attrs.has(tp):
            return self.structureClass(tp, value, path)
        if tp is bool:
            if not isinstance(value, bool):
                raise Invalid(f"expected true or false, got {value!r}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise Invalid(f"expected a whole number, got {value!r}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise Invalid(f"expected a number, got {value!r}")
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise Invalid(f"expected a string, got {_kind(value)}")
            return str(value)
        raise TypeError(f"unsupported settings type {tp!r}")  # a programming error

    def structureClass(self, cls: type, value: object, path: str) -> Any:
        """Structure a mapping into attrs class C{cls}; unknown keys are problems."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise Invalid(f"expected a mapping, got {_kind(value)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in attrs.fields(cls) if f.init}
        kwargs = {}
        ok = True
        for key, item in value.items():
            key = str(key)
            here = _join(path, key)
            if key not in fields:
                self.problem(here, f"unknown key{suggest(key, fields)}")
                ok = False
                continue
            field = fields[key]
            converted = self.structure(hints[key], item, here)
            if converted is attrs.NOTHING:
                ok = False
                continue
            reason = _checkBounds(field, converted)
            if reason:
                self.problem(here, reason)
                ok = False
                continue
            kwargs[key] = converted
        for name, field in fields.items():
            if field.default is attrs.NOTHING and name not in kwargs and name not in value:
                self.problem(_join(path, name), "required key is missing")
                ok = False
        if not ok:
            return attrs.NOTHING
        try:
            instance = cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise Invalid(str(e)) from None
        check = getattr(instance, "check", None)
        if check is not None:
            for sub, reason in check():
                self.problem(_join(path, sub), reason)
        return instance


def _checkBounds(field: attrs.Attribute, value: object) -> str | None:
    low = field.metadata.get("min")
    high = field.metadata.get("max")
    if low is not None and value < low:
        return f"must be at least {low}, got {value!r}"
    if high is not None and value > high:
        return f"must be at most {high}, got {value!r}"
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {value!r}"}.get(
        type(value), f"{value!r}"
    )


def structure(cls: type, data: object, file: str = "", path: str = "") -> Any:
    """
    Structure C{data} (parsed YAML) into settings class C{cls}.

    @raise ConfigError: listing every problem found.
    """
    walker = _Walker(file)
    result = walker.structure(cls, data, path)
    if walker.problems or result is attrs.NOTHING:
        raise ConfigError(walker.problems or [Problem(file, path, "invalid")])
    return result


# -- listeners ---------------------------------------------------------------


@frozen
class Listener:
    """
    One entry of a service's C{listen:} list: an endpoint string, or a mapping
    with C{endpoint:} and per-listener options.  A service that needs options
    subclasses this and adds fields; L{fromConfig} accepts both forms.
    """

    endpoint: str = field()
    #: Whether datagram (udp:) endpoints are accepted for this kind of listener.
    datagram: typing.ClassVar[bool] = False

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: _Walker) -> Any:
        if isinstance(value, str):
            value = {"endpoint": value}
        elif not isinstance(value, dict):
            raise Invalid(f"expected an endpoint string (e.g. tcp:7007:interface=127.0.0.1) "
                          f"or a mapping with endpoint:, got {_kind(value)}")
        instance = walker.structureClass(cls, value, path)
        if instance is attrs.NOTHING:
            return instance
        here = _join(path, "endpoint") if isinstance(value, dict) and len(value) > 1 else path
        try:
            kind = endpoints.validateServer(instance.endpoint)
        except endpoints.EndpointError as e:
            walker.problem(here, str(e))
            return attrs.NOTHING
        if kind == "udp" and not cls.datagram:
            walker.problem(here, f"this service does not listen on UDP: {instance.endpoint!r}")
            return attrs.NOTHING
        return instance


@frozen
class DatagramListener(Listener):
    """A listener that may also be a C{udp:} endpoint."""

    datagram: typing.ClassVar[bool] = True


# -- the settings every service has --------------------------------------------


@frozen
class ServiceSettings:
    """What every service's settings have besides C{listen:}."""

    enabled: bool = field(True)
    limits: Limits = field(factory=Limits)
    #: CIDR lists: C{deny} wins; a non-empty C{allow} admits only those clients.
    allow: list[str] = field(factory=list)
    deny: list[str] = field(factory=list)

    def check(self) -> list[tuple[str, str]]:
        return networkProblems(self, "allow", "deny")


# -- the top level -------------------------------------------------------------


@frozen
class LogSettings:
    format: Literal["text", "json"] = field("text")
    level: Literal["debug", "info", "warn", "error", "critical"] = field("info")
    #: A file to write to; default: standard output with twistd -n, twistd.log otherwise.
    file: str | None = field(None)


@frozen
class TLSSettings:
    #: C{auto} (self-signed, generated under state_dir) or a PEM certificate (chain) path.
    cert: str = field("auto")
    #: PEM private key path; defaults to the C{cert} file (a combined PEM).
    key: str | None = field(None)
    #: Names and addresses put in the generated certificate's subjectAltName.
    names: list[str] = field(factory=lambda: ["localhost", "127.0.0.1", "::1"])
    min_version: Literal["1.2", "1.3"] = field("1.2")

    def check(self) -> list[tuple[str, str]]:
        if self.cert == "auto" and self.key is not None:
            return [("key", "only used with a certificate file (cert is auto)")]
        return []


@frozen
class MetricsSettings:
    """Top-level C{metrics:}: a plain-HTTP /metrics listener (loopback only by default)."""

    listen: list[Listener] = field(factory=list)
    allow: list[str] = field(factory=lambda: ["127.0.0.0/8", "::1/128"])

    def check(self) -> list[tuple[str, str]]:
        return networkProblems(self, "allow")


class ServicesMap(dict):
    """C{services:}: service name -> that service's settings class."""

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: _Walker) -> ServicesMap:
        from netsvc.registry import serviceNames, settingsClass

        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise Invalid(f"expected a mapping of service names, got {_kind(value)}")
        out = cls()
        for name, svc in value.items():
            name = str(name)
            here = _join(path, name)
            if name not in serviceNames():
                walker.problem(here, f"unknown service{suggest(name, serviceNames())}; "
                                     f"known: {', '.join(serviceNames())}")
                continue
            settings = walker.structure(settingsClass(name), svc, here)
            if settings is not attrs.NOTHING:
                out[name] = settings
        return out


@frozen
class Settings:
    """The whole file."""

    #: Where generated certificates, queues and status live; relative to the file's folder.
    state_dir: str = field("var")
    log: LogSettings = field(factory=LogSettings)
    tls: TLSSettings = field(factory=TLSSettings)
    metrics: MetricsSettings = field(factory=MetricsSettings)
    #: On shutdown: how long open connections may go on after listening stops.
    drain_timeout: Duration = field(Duration(5), min=0, max=3600)
    services: ServicesMap = field(factory=ServicesMap)
    #: Worker processes sharing the listeners (auto: one per CPU); see netsvc.workers.
    workers: WorkerCount = field(WorkerCount(1))
    #: With workers > 1: auto pins each worker to its CPUs and hands each connection to the
    #: worker on the CPU it arrived on (netsvc.workers.affinity); off (default): neither.
    cpu_affinity: CPUAffinity = field(CPUAffinity("off"))
    #: The folder relative paths resolve against (not a YAML key).
    base_dir: str = attrs.field(default=".", kw_only=True, metadata={"internal": True})

    def path(self, p: str) -> Path:
        """Resolve a path from the file against the file's folder."""
        return Path(self.base_dir, os.path.expanduser(p))

    @property
    def stateDir(self) -> Path:
        return self.path(self.state_dir)

    def check(self) -> list[tuple[str, str]]:
        return checkWorkers(self)


def parse(text: str, file: str = "<string>", base_dir: str = ".") -> Settings:
    """
    Parse and validate YAML text.

    @raise ConfigError: for YAML syntax errors and every invalid setting.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = getattr(e, "problem", None) or str(e)
        if isinstance(e, yaml.reader.ReaderError):  # no mark: a character YAML cannot read
            line = text.count("\n", 0, e.position) + 1 if isinstance(text, str) else 0
            where = f"line {line}: " if line else ""
            reason = f"{e.reason}: {chr(e.character)!r}" if isinstance(e.character, int) else e.reason
        raise ConfigError([Problem(file, "", f"{where}YAML syntax error: {reason}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([Problem(file, "", f"expected a mapping at the top level, got {_kind(data)}")])
    if "base_dir" in data:
        raise ConfigError([Problem(file, "base_dir", "unknown key")])
    walker = _Walker(file)
    settings = walker.structureClass(Settings, data, "")
    if walker.problems or settings is attrs.NOTHING:
        raise ConfigError(walker.problems)
    return attrs.evolve(settings, base_dir=base_dir)


def load(filename: str) -> Settings:
    """
    Read and validate a configuration file.

    @raise ConfigError: the file is unreadable or invalid.
    """
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([Problem(filename, "", f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(filename, "", f"not UTF-8 text: {e.reason}")]) from None
    return parse(text, filename, os.path.dirname(os.path.abspath(filename)))
