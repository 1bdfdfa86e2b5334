"""
Users and passwords: the one auth interface every service uses.

    hashPassword("s3cret")                -> "scrypt:<salt hex>:<key hex>"
    hashPassword("s3cret", "ssha")        -> "{SSHA}<base64>"   (an LDAP userPassword)
    verifyPassword("s3cret", stored)      -> bool               (slow for scrypt: call it in a thread)

An L{Authenticator} answers two questions: does this user exist (C{isReserved},
synchronous and cheap: chat reserves such nicknames) and is this their password
(C{check}, a Deferred that fires C{True} or C{False}, never an error).  Where the
users come from is a L{UserSource} in the configuration:

    users: users.txt                        # a users file, "user:<hash>" lines
    users: {file: users.txt}
    users: {ldap: "ldap://127.0.0.1:3389", base: "ou=users,dc=example,dc=com", attribute: uid}
    users: {directory: true}                # this daemon's own services.ldap

L{authenticatorFor} builds the authenticator; the LDAP kinds live in
C{netsvc.ldap.authn} and are imported only when configured.

Hashing never runs in the reactor's default thread pool (that pool carries the
fsyncs the SMTP queue makes before every C{250}): every check goes through
L{hashPool}, a small L{HashPool} of its own with a bounded queue that refuses at
once (L{Refused}C{("busy")}, nothing hashed) when full.  Failed checks are
limited per client and overall by a L{FailureLimit}, reserve-first: a token is
taken before the hash is computed and given back when the password was right,
so parallel attempts from one address cannot all pass a limit checked before
any of them failed.  L{Limited} puts one in front of any L{Authenticator};
L{limitedCheck} is the same for a caller with its own hash check.

Hash formats understood by L{verifyPassword}: C{scrypt:salt:key} (what this module
writes; the same as chat's and the web admin's password lines), C{{SCRYPT}scrypt:...},
C{{SSHA}}, C{{SHA}}, C{{SSHA256}}, C{{SSHA512}} (RFC 2307 style, as slapd writes
them), C{{CRYPT}} (crypt(3): C{$6$}, C{$5$}, C{$y$}... whatever the system's libcrypt
knows) and, only when asked for (LDAP), cleartext.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import sys
import tempfile
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from threading import Thread
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from netsvc.config import Invalid, Problem, field, frozen
from netsvc.metrics import Counter, Registry
from netsvc.rates import RateLimiter

log = Logger()

#: scrypt cost: 16 MiB of memory and ~50 ms per check, the same as the lines written before this module.
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

_SALTED_SHA = {"{SSHA}": hashlib.sha1, "{SSHA256}": hashlib.sha256, "{SSHA512}": hashlib.sha512}
_DIGEST_SIZE = {"{SSHA}": 20, "{SSHA256}": 32, "{SSHA512}": 64}

#: What an unknown user's password is checked against, so that "no such user" costs what a wrong
#: password costs (no user enumeration by timing).
_DUMMY = "scrypt:" + "00" * 16 + ":" + "00" * 32


# -- hashes --------------------------------------------------------------------


def hashPassword(password: str, scheme: str = "scrypt", salt: bytes | None = None) -> str:
    """
    The stored form of C{password}: C{scheme} is C{"scrypt"} (C{scrypt:<salt>:<key>})
    or C{"ssha"} (C{{SSHA}...}, for LDIF files and tools that only know RFC 2307 hashes).

    @raise ValueError: an unknown scheme.
    """
    if scheme == "scrypt":
        salt = os.urandom(16) if salt is None else salt
        key = hashlib.scrypt(password.encode("utf-8"), salt=salt, **SCRYPT)  # type: ignore[arg-type]
        return f"scrypt:{salt.hex()}:{key.hex()}"
    if scheme == "ssha":
        salt = os.urandom(8) if salt is None else salt
        digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
        return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")
    raise ValueError(f"unknown password scheme {scheme!r} (scrypt or ssha)")


def verifyPassword(password: str, stored: str, plain: bool = False) -> bool:
    """
    Whether C{password} matches C{stored} (any format in the module docstring).  A
    value in no known format matches nothing, unless C{plain} is set (LDAP
    cleartext C{userPassword}).  Never raises.
    """
    try:
        return _verify(password.encode("utf-8"), stored, plain)
    except (ValueError, TypeError, UnicodeError):
        return False


def _verify(password: bytes, stored: str, plain: bool) -> bool:
    if stored.startswith("scrypt:"):
        _, salt, key = stored.split(":")
        expected = bytes.fromhex(key)
        got = hashlib.scrypt(password, salt=bytes.fromhex(salt), **SCRYPT)  # type: ignore[arg-type]
        return hmac.compare_digest(got, expected)
    scheme, brace, rest = stored.partition("}")
    scheme = (scheme + brace).upper()
    if not brace or not scheme.startswith("{"):
        return plain and hmac.compare_digest(password, stored.encode("utf-8"))
    if scheme == "{SCRYPT}":
        return _verify(password, rest, False)
    if scheme in _SALTED_SHA:
        raw = base64.b64decode(rest, validate=True)
        size = _DIGEST_SIZE[scheme]
        if len(raw) < size:
            return False
        digest, salt = raw[:size], raw[size:]
        return hmac.compare_digest(_SALTED_SHA[scheme](password + salt).digest(), digest)
    if scheme == "{SHA}":
        return hmac.compare_digest(hashlib.sha1(password).digest(), base64.b64decode(rest, validate=True))
    if scheme == "{CRYPT}":
        crypted = _crypt(password.decode("utf-8"), rest)
        return crypted is not None and hmac.compare_digest(crypted.encode(), rest.encode())
    if scheme == "{CLEARTEXT}":
        return plain and hmac.compare_digest(password, rest.encode("utf-8"))
    return False


def _crypt(password: str, setting: str) -> str | None:
    """crypt(3) through the system libcrypt (the standard library's C{crypt}, deprecated but still in 3.11/3.12)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt  # removed in Python 3.13: {CRYPT} hashes then match nothing
        except ImportError:
            return None
    return crypt.crypt(password, setting)


# -- the hashing pool and failure limits -----------------------------------------


class Refused:
    """
    The answer of a password check that was not made: falsy (callers that only
    test the truth of the answer treat it as a wrong password), with C{reason}
    C{"busy"} (the hashing pool's queue is full) or C{"rate"} (too many failures
    from this client, or overall) and C{retryAfter} (seconds, an estimate).
    """

    __slots__ = ("reason", "retryAfter")

    def __init__(self, reason: str, retryAfter: float = 1.0) -> None:
        self.reason = reason
        self.retryAfter = retryAfter

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Refused({self.reason!r}, {self.retryAfter:g})"


class PoolBusy(Exception):
    """L{HashPool.run}: the queue is full; nothing was run."""


class _DaemonThread(Thread):
    """A hashing thread never keeps the process alive (it holds nothing that must be finished)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class _HashThreadPool(ThreadPool):
    threadFactory = _DaemonThread


class HashPool:
    """
    A small thread pool for password hashing, apart from the reactor's default
    pool, with a bounded queue: at most C{threads} checks run and C{queue} more
    wait; beyond that L{run} fails at once with L{PoolBusy} and L{verify} answers
    L{Refused}C{("busy")}, without hashing.  The threads start at the first check
    and stop when the reactor shuts down (or at L{stop}; a later check starts them
    again).  Everything but the work itself happens on the reactor thread.

    C{verify} is the function L{verify} runs (default: L{verifyPassword}, looked
    up at each call); tests pass a fake.
    """

    def __init__(self, reactor: Any = None, threads: int = 2, queue: int = 32,
                 verify: Callable[..., bool] | None = None, name: str = "netsvc-hash") -> None:
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.reactor = reactor
        self.threads = threads
        self.queue = queue
        self.name = name
        self._verify = verify
        self._pool: ThreadPool | None = None
        self._trigger: Any = None
        #: Checks queued or running now.
        self.pending = 0
        #: Checks run, and checks refused because the queue was full.
        self.ran = Counter()
        self.refusedBusy = Counter()

    def countInto(self, registry: Registry) -> None:
        """
        Count into C{registry} from now on (idempotent): C{netsvc_password_hashes_total},
        C{netsvc_password_hash_busy_total} (refused, queue full) and the gauge
        C{netsvc_password_hash_pending} (queued or running).
        """
        ran = registry.counter("netsvc_password_hashes_total", "Password checks run in the hashing pool.")
        busy = registry.counter("netsvc_password_hash_busy_total",
                                "Password checks refused without hashing: the hashing pool's queue was full.")
        for family, attr in ((ran, "ran"), (busy, "refusedBusy")):
            counter = family.children[()]
            old = getattr(self, attr)
            if counter is not old:
                counter.inc(old.value)  # type: ignore[union-attr]
                setattr(self, attr, counter)
        registry.gauge("netsvc_password_hash_pending",
                       "Password checks queued or running in the hashing pool.").children[()].setFunction(
            lambda: self.pending)  # type: ignore[union-attr]

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """
        C{f(*args, **kwargs)} in one of the pool's threads: a Deferred of its
        result.  Fails at once with L{PoolBusy} (C{f} not called) when
        C{threads + queue} calls are already queued or running.
        """
        if self.pending >= self.threads + self.queue:
            self.refusedBusy.inc()
            return defer.fail(PoolBusy(f"{self.pending} password checks already waiting"))
        pool = self._start()
        self.pending += 1
        self.ran.inc()
        d = deferToThreadPool(self.reactor, pool, f, *args, **kwargs)
        d.addBoth(self._finished)
        return d

    def verify(self, password: str, stored: str, plain: bool = False) -> defer.Deferred:
        """
        Fires with L{verifyPassword}C{(password, stored, plain)} computed in the
        pool, or with L{Refused}C{("busy")} when the queue is full.  Never fails.
        """
        return self.tryRun(self._verify or verifyPassword, password, stored, plain)

    def tryRun(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        """L{run}, but L{PoolBusy} becomes L{Refused}C{("busy")} and any other error False (logged)."""
        d = self.run(f, *args)

        def failed(failure: Any) -> Any:
            if failure.check(PoolBusy):
                return Refused("busy", 1.0)
            log.failure("password check failed", failure)
            return False

        return d.addErrback(failed)

    def _finished(self, result: Any) -> Any:
        self.pending -= 1
        return result

    def _start(self) -> ThreadPool:
        if self._pool is None:
            pool = _HashThreadPool(0, self.threads, self.name)
            pool.start()
            self._pool = pool
            self._trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self._pool

    def stop(self) -> None:
        """Stop the threads (waiting for the checks already queued).  A later check starts them again."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass  # we are the trigger running now
            self._trigger = None
        pool.stop()


_pools: dict[int, HashPool] = {}


def hashPool(reactor: Any = None) -> HashPool:
    """The process's one L{HashPool} (per reactor): 2 threads, 32 waiting."""
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]
    pool = _pools.get(id(reactor))
    if pool is None or pool.reactor is not reactor:
        pool = _pools[id(reactor)] = HashPool(reactor)
    return pool


class FailureLimit:
    """
    Failed password checks allowed per client (C{rate} per second, C{burst} at
    once, per key -- an IP address) and overall (C{overallRate}, C{overallBurst},
    whatever the key), used reserve-first:

        if not limit.reserve(client): answer "try later" (nothing checked)
        ... check ...; if it succeeded (or was not made): limit.refund(client)

    A rate of 0 means no limit of that kind.  C{refusedRate} and C{refusedBusy}
    count refusals (counters of C{netsvc_password_checks_refused_total} in
    C{registry} under C{service}, when given).
    """

    def __init__(self, clock: Any, rate: float = 0.2, burst: float = 10,
                 overallRate: float = 20.0, overallBurst: float = 100,
                 registry: Registry | None = None, service: str = "", maxKeys: int = 65536) -> None:
        self.clock = clock
        self.perClient = RateLimiter(rate, burst, clock, maxKeys)
        self.overall = RateLimiter(overallRate, overallBurst, clock, 1)
        if registry is not None:
            family = registry.counter("netsvc_password_checks_refused_total",
                                      "Password checks answered without hashing, by reason (rate, busy).",
                                      ["service", "reason"])
            self.refusedRate: Counter = family.labels(service=service, reason="rate")  # type: ignore[assignment]
            self.refusedBusy: Counter = family.labels(service=service, reason="busy")  # type: ignore[assignment]
        else:
            self.refusedRate, self.refusedBusy = Counter(), Counter()

    def reserve(self, client: Any) -> bool:
        """
        Take one failure from C{client}'s allowance and the overall one; False
        (nothing taken) when either is spent.
        """
        if not self.perClient.allow(client):
            self.refusedRate.inc()
            return False
        if not self.overall.allow(None):
            self.perClient.refund(client)
            self.refusedRate.inc()
            return False
        return True

    def refund(self, client: Any) -> None:
        """Give back what L{reserve} took (the password was right, or it was not checked)."""
        self.perClient.refund(client)
        self.overall.refund(None)

    def retryAfter(self, client: Any) -> float:
        """Seconds until C{client} may try again (at least 1)."""
        wait = 1.0
        for limiter, key in ((self.perClient, client), (self.overall, None)):
            if limiter.rate > 0:
                wait = max(wait, (1 - limiter.available(key)) / limiter.rate)
        return float(int(wait + 0.999))


def limitedCheck(limit: FailureLimit | None, client: Any,
                 check: Callable[[], defer.Deferred]) -> defer.Deferred:
    """
    C{check()} (a Deferred of a bool, or of L{Refused}) behind C{limit}, reserve-first:
    with C{client}'s (or the overall) allowance spent, fires L{Refused}C{("rate")}
    at once without calling C{check}; a success or a L{Refused} answer gives the
    reservation back; an error is a failure (logged, False).  Never fails.
    """
    if limit is not None and not limit.reserve(client):
        return defer.succeed(Refused("rate", limit.retryAfter(client)))
    d = defer.maybeDeferred(check)

    def done(ok: Any) -> Any:
        if isinstance(ok, Refused):
            if limit is not None:
                limit.refund(client)
                if ok.reason == "busy":
                    limit.refusedBusy.inc()
            return ok
        if ok is True and limit is not None:
            limit.refund(client)
        return ok is True

    def failed(f: Any) -> bool:
        log.failure("checking a password", f)
        return False

    return d.addErrback(failed).addCallback(done)


class Limited:
    """
    An L{Authenticator} with a L{FailureLimit} in front: C{check(user, password,
    client)} fires L{Refused}C{("rate")} without checking once C{client} (or
    everyone together) failed too often.  Without C{client}, only the overall
    limit applies.
    """

    def __init__(self, authenticator: Any, limit: FailureLimit) -> None:
        self.authenticator = authenticator
        self.limit = limit

    def isReserved(self, user: str) -> bool:
        return self.authenticator.isReserved(user)

    def check(self, user: str, password: str, client: Any = None) -> defer.Deferred:
        return limitedCheck(self.limit, client, lambda: self.authenticator.check(user, password))

    def __getattr__(self, name: str) -> Any:
        # the rest of the authenticator's surface (close(), a directory's refresh...) is the wrapped one's
        return getattr(self.authenticator, name)


# -- authenticators ------------------------------------------------------------


class Authenticator(typing.Protocol):
    """Who the users are, and whether a password is theirs."""

    def isReserved(self, user: str) -> bool:
        """Whether C{user} exists (synchronous and cheap)."""

    def check(self, user: str, password: str, client: Any = None) -> defer.Deferred[bool]:
        """
        Fires with whether C{password} is C{user}'s; never fails.  Hashing runs in
        L{hashPool}; when its queue is full the answer is L{Refused}C{("busy")} (falsy).
        C{client} (an address) is what L{Limited} counts failures against; the
        others ignore it.
        """


class UsersFile:
    """
    An L{Authenticator} over a file of C{user:<stored hash>} lines (C{#} comments,
    blank lines ignored; user names case-insensitive).  The file is re-read when its
    modification time or size changes; a file that cannot be read keeps the last
    good contents (and is logged).
    """

    def __init__(self, path: str | Path, verify: Any = None, pool: HashPool | None = None) -> None:
        self.path = Path(path)
        self._pool = pool
        self._verify = verify or (lambda password, stored: (self._pool or hashPool()).verify(password, stored))
        self._stamp: tuple[float, int] | None = None
        self._entries: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the file if it changed."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            log.error("cannot read users file {path}: {error}", path=str(self.path),
                      error=getattr(e, "strerror", None) or str(e))
            return
        self._entries = parseUsers(text, str(self.path))
        self._stamp = stamp

    def users(self) -> list[str]:
        self.reload()
        return sorted(self._entries)

    def isReserved(self, user: str) -> bool:
        self.reload()
        return user.lower() in self._entries

    def check(self, user: str, password: str, client: Any = None) -> defer.Deferred[bool]:
        self.reload()
        stored = self._entries.get(user.lower())
        d = self._verify(password, stored or _DUMMY)
        d.addCallback(lambda ok: ok if isinstance(ok, Refused) else bool(ok) and stored is not None)
        d.addErrback(lambda f: log.failure("checking a password for {user}", f, user=user) and False)
        return d


def parseUsers(text: str, name: str = "users file") -> dict[str, str]:
    """C{user:<hash>} lines -> {lowercased user: hash}; bad lines are logged and skipped."""
    entries = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user or not stored:
            log.warn("{name}:{n}: expected user:<password hash>", name=name, n=n)
            continue
        entries[user.lower()] = stored
    return entries


def addUser(path: str | Path, user: str, password: str, scheme: str = "scrypt") -> None:
    """
    Add C{user} to the users file at C{path}, or replace their line; the file is
    rewritten atomically (mode 0600) and created if missing.

    @raise ValueError: the user name cannot be stored (empty, or has C{:} or a line break).
    """
    if not user or any(c in user for c in ":\r\n#") or user != user.strip():
        raise ValueError(f"bad user name {user!r}")
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    line = f"{user}:{hashPassword(password, scheme)}"
    kept = [existing for existing in lines
            if existing.partition(":")[0].strip().lower() != user.lower() or existing.lstrip().startswith("#")]
    text = "\n".join([*kept, line]) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- configuration ---------------------------------------------------------------


@frozen
class UserSource:
    """
    Where a service's users come from: exactly one of C{file}, C{ldap} (a directory
    server's URL) or C{directory} (this daemon's C{services.ldap}).  In YAML a plain
    string is a users file.
    """

    file: str | None = field(None)
    #: C{ldap://host:port} or C{ldaps://host:port}.
    ldap: str | None = field(None)
    directory: bool = field(False)
    #: For C{ldap}: where users are searched, by which attribute, and how to connect.
    base: str | None = field(None)
    attribute: str = field("uid")
    starttls: bool = field(False)
    cacert: str | None = field(None)
    bind_dn: str | None = field(None)
    bind_password_file: str | None = field(None)
    timeout: float = field(5.0, min=0.1, max=300)

    @property
    def kind(self) -> str:
        return "file" if self.file else "ldap" if self.ldap else "directory"

    @classmethod
    def fromConfig(cls, value: object, path: str, walker: Any) -> Any:
        if isinstance(value, str):
            value = {"file": value}
        elif not isinstance(value, dict):
            raise Invalid("expected a users file name, or a mapping with file:, ldap: or directory:")
        return walker.structureClass(cls, value, path)

    def check(self) -> list[tuple[str, str]]:
        chosen = [k for k in ("file", "ldap", "directory") if getattr(self, k)]
        if len(chosen) != 1:
            return [("", "give exactly one of file:, ldap: or directory: true"
                     + (f" (got {', '.join(chosen)})" if chosen else ""))]
        problems = []
        if self.ldap:
            if not self.ldap.lower().startswith(("ldap://", "ldaps://")):
                problems.append(("ldap", f"expected ldap://host:port or ldaps://host:port, got {self.ldap!r}"))
            if not self.base:
                problems.append(("base", "required with ldap: (where the users are, e.g. ou=users,dc=example,dc=com)"))
        else:
            extra = [k for k in ("base", "cacert", "bind_dn", "bind_password_file")
                     if getattr(self, k) is not None] + (["starttls"] if self.starttls else [])
            problems += [(k, "only used with ldap:") for k in extra]
        if bool(self.bind_dn) != bool(self.bind_password_file):
            problems.append(("bind_dn", "bind_dn and bind_password_file go together"))
        return problems


class UserSourceError(Exception):
    """A configured user source cannot be used (the message says why)."""


def authenticatorFor(source: UserSource, context: Any, key: str = "users") -> Authenticator:
    """
    The authenticator for C{source}.  C{context} is the daemon's (for paths relative
    to the config file, the reactor and, for C{directory}, the LDAP service).

    @raise netsvc.runtime.StartupError: the source cannot be used (e.g. the users file is missing);
        C{key} is the config path of C{source} (e.g. C{services.smtp.users}), named in the message.
    """
    from netsvc.runtime import StartupError

    if source.kind == "file":
        path = context.settings.path(source.file)
        if not path.is_file():
            raise StartupError([Problem(context.configFile, key, f"cannot read users file {path}")])
        hashPool(context.reactor).countInto(context.metrics)
        return UsersFile(path)
    from netsvc.ldap import authn  # only when an LDAP source is configured

    return authn.authenticatorFor(source, context, key)


def _main(argv: list[str]) -> int:
    """C{python -m netsvc.auth USER [FILE]}: print a users-file line, or add it to FILE."""
    if len(argv) not in (1, 2):
        sys.stderr.write("usage: python -m netsvc.auth USER [FILE]   (asks for the password)\n")
        return 2
    user = argv[0]
    password = getpass.getpass(f"password for {user}: ")
    if len(argv) == 2:
        addUser(argv[1], user, password)
    else:
        print(f"{user}:{hashPassword(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
