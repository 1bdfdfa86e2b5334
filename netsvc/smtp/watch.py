"""
How the delivery owner of C{workers: N} learns of mail the other workers committed.

    watcher = QueueWatcher(queue.env, onNew, reactor, ignore=lambda id: ...)
    watcher.setServiceParent(svc)      # onNew(id) for each envelope committed into env/

Two sources, both calling C{onNew(id)}, which must be idempotent (an id may be
reported more than once, or after it was removed):

  - Linux inotify (C{twisted.internet.inotify}, C{IN_MOVED_TO} on C{env/}: a
    commit is a rename into it): within a reactor turn of the commit.  Events for
    ids C{ignore} says are this process's own (its commits call their hook
    directly) are dropped.
  - A scan of C{env/} when it starts (once the watch is set) and every C{interval}
    seconds (L{SCAN_INTERVAL}; L{SCAN_ALONE} without inotify), the safety net for what inotify cannot promise: its event
    queue can overflow (Twisted drops the overflow event), and another OS has none.
    The scan reports every id, own ones included.

The watcher only reads; it never changes the queue.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger()

#: Seconds between scans of env/ when inotify reports commits, and when it cannot.
SCAN_INTERVAL = 5.0
SCAN_ALONE = 1.0
_SUFFIX = ".json"


class QueueWatcher(service.Service):
    """
    @param folder: the queue's C{env/}.
    @param onNew: called with each id found (in the reactor).
    @param ignore: ids for which inotify events are not reported (the scan still reports them).
    @param useInotify: False: the scan alone (tests, or to compare).
    """

    def __init__(self, folder: Path, onNew: Callable[[str], None], reactor: Any,
                 ignore: Callable[[str], bool] = lambda id: False, useInotify: bool = True,
                 interval: float | None = None) -> None:
        self.folder = Path(folder)
        self.onNew = onNew
        self.reactor = reactor
        self.ignore = ignore
        self.useInotify = useInotify
        self.interval = interval
        self.notifier: Any = None
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        service.Service.startService(self)
        if self.useInotify:
            self.notifier = self._startInotify()
        interval = self.interval or (SCAN_INTERVAL if self.notifier is not None else SCAN_ALONE)
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self.reactor
        # now=True: a commit between the owner's start-up read of the queue and the watch would otherwise wait
        # for the first scan.
        self._loop.start(interval, now=True).addErrback(lambda f: log.failure("queue scan", f))

    def stopService(self) -> None:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.notifier is not None:
            self.notifier.loseConnection()
            self.notifier = None

    def _startInotify(self) -> Any:
        try:
            from twisted.internet import inotify

            notifier = inotify.INotify(self.reactor)
        except Exception as e:  # not Linux, or no inotify instances left: the scan alone
            log.info("queue: no inotify ({error}); scanning every {n}s", error=str(e), n=SCAN_ALONE)
            return None
        try:
            notifier.watch(FilePath(str(self.folder)), mask=inotify.IN_MOVED_TO, callbacks=[self._event])
        except Exception as e:
            log.info("queue: cannot watch {folder} ({error}); scanning every {n}s", folder=str(self.folder),
                     error=str(e), n=SCAN_ALONE)
            notifier.loseConnection()
            return None
        notifier.startReading()
        return notifier

    def _event(self, _: Any, path: FilePath, mask: int) -> None:
        name = path.basename()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if not name.endswith(_SUFFIX):
            return
        id = name[:-len(_SUFFIX)]
        if self.ignore(id):
            return
        self._report(id)

    def scan(self) -> None:
        """Report every id in the folder now."""
        try:
            names = os.listdir(self.folder)
        except OSError as e:
            log.error("queue: cannot list {folder}: {error}", folder=str(self.folder), error=str(e))
            return
        for name in names:
            if name.endswith(_SUFFIX):
                self._report(name[:-len(_SUFFIX)])

    def _report(self, id: str) -> None:
        try:
            self.onNew(id)
        except Exception:  # one bad id must not stop the others, nor the watcher
            log.failure("queue: handling {id}", id=id)
