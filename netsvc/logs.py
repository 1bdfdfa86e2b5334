"""
Log observers for C{log:} settings: text or JSON lines, filtered by level.

Twisted's own per-port lines (C{EchoFactory starting on 7007}, C{(TCP Port 7007
Closed)}, a noisy factory's C{Starting factory <...>}) are dropped
(L{dropTwistedPortLines}): netsvc logs one line per listener itself, with the
configuration key it came from.

Why not C{jsonFileLogObserver}: it serialises Twisted's internal fields
(C{log_logger}, C{log_source} ...) and separates records with RS; operators want
one flat JSON object per line (C{jq}-friendly): time, level, namespace, message,
and the event's own structured fields.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}

#: The lowest level an observer built by L{observerFor} lets through (debug until one is built).
_lowest = LogLevel.debug


def wants(level: LogLevel) -> bool:
    """
    Whether an event of C{level} can reach the configured log.  Hot paths ask
    first: a Twisted C{Logger} builds and publishes every event, filtered or not.
    """
    return level >= _lowest


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on one line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in ("format", "message", "time", "system", "isError"):
                continue
            record[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()


def openLogFile(path: str) -> IO[str]:
    """
    A rotating L{LogFile} for a regular file.  A device or a pipe (C{/dev/null},
    C{/dev/stdout}) is opened plainly: rotating renames the file, which for
    C{/dev/null} would leave a regular file in its place.
    """
    if os.path.exists(path) and not os.path.isfile(path):
        return open(path, "a", encoding="utf-8")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return LogFile.fromFullPath(path)


#: What twisted.internet's ports log through the legacy log.msg, once per listener start and stop.
_PORT_LINE = re.compile(r"^(?:.+ starting on (?:\d+|'.*'|b'.*')|\((?:TCP|UDP|UNIX|SSL|TLS) Port \S+ Closed\))$")


#: What a "noisy" Twisted factory says at every start and stop (an object repr, nothing a person needs).
_FACTORY_FORMATS = ("Starting factory {factory!r}", "Stopping factory {factory!r}")


def dropTwistedPortLines(event: dict[str, Any]) -> PredicateResult:
    """
    A filter predicate: no for Twisted's "Factory starting on N" / "(TCP Port N
    Closed)" lines and a noisy factory's "Starting factory <...>".
    """
    if event.get("log_format") in _FACTORY_FORMATS:
        return PredicateResult.no
    if event.get("log_namespace") == "log_legacy" and not event.get("isError"):
        message = event.get("message")
        if isinstance(message, tuple) and len(message) == 1 and isinstance(message[0], str) \
                and _PORT_LINE.match(message[0]):
            return PredicateResult.no
    return PredicateResult.maybe


def observerFor(settings: Any, stream: IO[str] | None = None) -> ILogObserver:
    """
    An observer for L{netsvc.config.LogSettings}, writing to C{stream}, or to
    C{settings.file} (a rotating L{LogFile}), or to standard output.
    """
    if stream is None:
        stream = openLogFile(settings.file) if settings.file else sys.stdout
    if settings.format == "json":
        observer: ILogObserver = JSONLinesObserver(stream)
    else:
        observer = textFileLogObserver(stream)
    global _lowest
    _lowest = LEVELS[settings.level]
    predicate = LogLevelFilterPredicate(defaultLogLevel=_lowest)
    return FilteringLogObserver(observer, [dropTwistedPortLines, predicate])
