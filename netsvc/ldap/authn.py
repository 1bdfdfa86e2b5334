"""
The LDAP backends of L{netsvc.auth}: users kept in a directory.

    users: {ldap: "ldap://127.0.0.1:3389", base: "ou=users,dc=example,dc=com", attribute: uid,
            starttls: true, cacert: ca.pem, bind_dn: "cn=reader,dc=example,dc=com",
            bind_password_file: reader.pw}      -> L{RemoteDirectory}
    users: {directory: true}                    -> L{LocalDirectory} (this daemon's services.ldap)

L{authenticatorFor} is what C{netsvc.auth.authenticatorFor} calls for those two kinds.

L{RemoteDirectory.check} searches the user's DN by C{attribute} (bound as C{bind_dn},
or anonymously), then binds as that DN with the password: the directory server
decides.  Connections are pooled and bounded (L{SEARCH_CONNECTIONS} +
L{BIND_CONNECTIONS}; more checks wait their turn), every operation has the
source's C{timeout}, and the whole check is bounded too: a directory that is down
or hangs makes C{check} fire False (logged once, and once more when it is back),
never an error and never a hang.  An empty password is False without asking the
server (a simple bind with an empty password is an anonymous bind, RFC 4513 5.1.2).

Timing: an unknown user name (or an ambiguous one) costs the same round trips as
a wrong password -- the search, then a bind with the password as C{UNKNOWN_RDN}
under the base.  What remains is the server's own work: a server that answers
a bind to a DN it does not have without hashing (slapd does; netsvc's own
directory hashes a dummy) answers it faster than a wrong password, by about one
hash of the user's scheme (microseconds for {SSHA}, ~50 ms for scrypt).

L{RemoteDirectory.isReserved} must answer at once, so it answers from a cache of
the names in the directory: loaded when the reactor starts (or at the first
question), refreshed in the background every L{REFRESH} seconds (L{RETRY} after a
failure) with a paged search, and every user that passes C{check} is added to it.
Until the first load completes, and for names added to the directory since the
last refresh, a name is not reserved.  At most L{MAX_KNOWN} names are kept.

L{LocalDirectory} asks C{context.directory} (L1's Directory: C{findUser},
C{checkPassword}), looked up at each call, so the service using it may be built
before services.ldap; without services.ldap every check is False (logged once).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ldaptor.protocols import pureldap
from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure

from netsvc.auth import Refused
from netsvc.ldap import client

log = Logger()

SEARCH_CONNECTIONS = 2
BIND_CONNECTIONS = 4
#: Seconds between refreshes of the known names (and after a failed refresh).
REFRESH = 60.0
RETRY = 10.0
MAX_KNOWN = 100_000
#: Longer user names are refused without asking the directory.
MAX_NAME = 256
PAGE = 500

_NO_SUCH_DN = "cn=no such user"
#: The RDN an unknown user's password is bound as, under the base (a name no directory has).
UNKNOWN_RDN = "cn=netsvc-no-such-user-0c5e1f"


class Pool:
    """
    At most C{size} connections made by C{open()}, reused while they stay
    connected; L{run} waits for a free one.  A connection whose operation failed
    for any reason but an LDAP result (timeout, lost, cancelled) is dropped.
    """

    def __init__(self, open: Callable[[], Awaitable[Any]], size: int) -> None:
        self._open = open
        self._idle: list[Any] = []
        self._slots = defer.DeferredSemaphore(size)

    async def run(self, operation: Callable[[Any], Any]) -> Any:
        """
        C{operation(connection)} on an idle connection or a new one.  When a reused
        connection turns out to be closed (the server's idle timeout), it is tried
        once more on a new one.
        """
        await self._slots.acquire()
        try:
            conn = None
            while self._idle and conn is None:
                candidate = self._idle.pop()
                conn = candidate if candidate.connected else None
            if conn is not None:
                try:
                    return await self._attempt(conn, operation)
                except error.ConnectionClosed:
                    pass
            return await self._attempt(await self._open(), operation)
        finally:
            self._slots.release()

    async def _attempt(self, conn: Any, operation: Callable[[Any], Any]) -> Any:
        try:
            result = await operation(conn)
        except client.LDAPError:
            self._keep(conn)
            raise
        except BaseException:
            if conn.connected:
                conn.transport.abortConnection()
            raise
        self._keep(conn)
        return result

    def _keep(self, conn: Any) -> None:
        if conn.connected:
            self._idle.append(conn)

    def close(self) -> None:
        """Unbind the idle connections (those in use close when their operation ends badly or at exit)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.unbind()


class RemoteDirectory:
    """An L{netsvc.auth.Authenticator} over an LDAP server (see the module docstring)."""

    def __init__(self, reactor: Any, url: client.LDAPURL, base: str, attribute: str = "uid",
                 starttls: bool = False, cacert: str | None = None, bindDN: str | None = None,
                 bindPassword: str = "", timeout: float = 5.0,
                 connect: Callable[..., Any] = client.connect) -> None:
        self.reactor = reactor
        self.url = url
        self.base = base
        self.attribute = attribute
        self.starttls = starttls
        self.cacert = cacert
        self.bindDN = bindDN
        self.bindPassword = bindPassword
        self.timeout = timeout
        self._connect = connect
        self._searches = Pool(self._openSearch, SEARCH_CONNECTIONS)
        self._binds = Pool(self._openBind, BIND_CONNECTIONS)
        self._problem: str | None = None
        self._lastRefusal: str | None = None
        self._known: set[str] = set()
        self._knownAt: float | None = None
        self._nextRefresh = 0.0
        self._refreshing: defer.Deferred | None = None

    # -- connections ----------------------------------------------------------------

    async def _openBind(self) -> Any:
        return await self._connect(self.reactor, self.url, starttls=self.starttls, cacert=self.cacert,
                                   timeout=self.timeout)

    async def _openSearch(self) -> Any:
        conn = await self._openBind()
        if self.bindDN:
            try:
                await conn.bind(self.bindDN, self.bindPassword)
            except BaseException:
                conn.unbind()
                raise
        return conn

    def close(self) -> None:
        """Stop a refresh in progress and unbind the idle connections."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        self._searches.close()
        self._binds.close()

    # -- health ---------------------------------------------------------------------

    def _trouble(self, what: str, reason: BaseException) -> None:
        # Logged once per distinct reason (a down server fails every check the same way).
        why = client.describe(reason, self.url.host)
        if why != self._problem:
            log.error("users in {url}: {problem}; checks fail until it answers", url=str(self.url),
                      problem=f"{what}: {why}")
            self._problem = why

    def _fine(self) -> None:
        if self._problem is not None:
            log.info("users in {url}: answering again", url=str(self.url))
            self._problem = None

    # -- check ------------------------------------------------------------------------

    def _userFilter(self, user: str) -> Any:
        # Built as an object, not as text: nothing in the user name can change the filter.
        return pureldap.LDAPFilter_equalityMatch(
            attributeDesc=pureldap.LDAPAttributeDescription(self.attribute.encode("utf-8")),
            assertionValue=pureldap.LDAPAssertionValue(user.encode("utf-8")))

    async def _findDN(self, conn: Any, user: str) -> str | None:
        found: list[str] = []
        done = await conn.search(self.base, client.SCOPES["sub"], self._userFilter(user), ["1.1"],
                                 onEntry=lambda dn, attrs: found.append(dn), sizeLimit=2)
        if done.resultCode not in (0, 4):
            raise done.error()
        return found[0] if len(found) == 1 else None  # none, or ambiguous: never authenticates

    async def _check(self, user: str, password: str) -> bool:
        try:
            dn = await self._searches.run(lambda conn: self._findDN(conn, user))
        except Exception as e:
            self._trouble(f"searching {self.attribute}={user} under {self.base}", e)
            return False
        if dn is None:
            # Unknown (or ambiguous): the same bind round trip as for a wrong password, to a DN
            # that does not exist, so that the answer's time does not say the name is unknown.
            try:
                await self._binds.run(lambda conn: conn.bind(f"{UNKNOWN_RDN},{self.base}", password))
            except Exception:
                pass
            self._fine()
            return False
        try:
            await self._binds.run(lambda conn: conn.bind(dn, password))
        except client.LDAPError as e:
            self._fine()
            # A plain 49 is a wrong password; anything said with it (netsvc's own directory: "too many
            # failed binds from this address") or another code is worth a line, once in a row.
            if (e.resultCode != 49 or e.message) and str(e) != self._lastRefusal:
                log.warn("users in {url}: bind as {dn}: {error}", url=str(self.url), dn=dn, error=str(e))
            self._lastRefusal = str(e) if (e.resultCode != 49 or e.message) else None
            return False
        except Exception as e:
            self._trouble(f"bind as {dn}", e)
            return False
        self._fine()
        if len(self._known) < MAX_KNOWN:
            self._known.add(user.lower())
        return True

    def check(self, user: str, password: str, client: Any = None) -> defer.Deferred:
        """
        Fires with whether C{password} is C{user}'s; False (never an error) when the
        directory fails.  C{client} is not used (limits are L{netsvc.auth.Limited}'s).
        """
        if not password or not user or len(user) > MAX_NAME:
            return defer.succeed(False)
        d = defer.ensureDeferred(self._check(user, password))
        # Waiting for a pooled connection, connecting, StartTLS, search, bind: bounded as a whole.
        d.addTimeout(self.timeout * 3, self.reactor)

        def failed(f: Any) -> bool:
            self._trouble(f"checking {user}", f.value)
            return False

        return d.addErrback(failed)

    # -- reserved names ------------------------------------------------------------------

    def isReserved(self, user: str) -> bool:
        """Whether C{user} is a name in the directory, from the cache (refreshed in the background)."""
        self.refresh(force=False)
        return user.lower() in self._known

    @property
    def namesLoaded(self) -> bool:
        """Whether the names have loaded once (until then L{isReserved} cannot say no)."""
        return self._knownAt is not None

    def refresh(self, force: bool = True) -> defer.Deferred:
        """(Re)load the known names now (or, unless C{force}, only when due); fires when done, never fails."""
        if self._refreshing is not None:
            return self._refreshing
        if not force and self.reactor.seconds() < self._nextRefresh:
            return defer.succeed(None)
        d = self._refreshing = defer.ensureDeferred(self._load())
        d.addTimeout(self.timeout * 3, self.reactor)

        def finished(result: Any) -> None:
            self._refreshing = None
            if isinstance(result, Failure):
                self._trouble(f"listing the {self.attribute} names under {self.base}", result.value)
                self._nextRefresh = self.reactor.seconds() + RETRY

        return d.addBoth(finished)

    async def _load(self) -> None:
        names: set[str] = set()
        wanted = self.attribute.lower()

        def onEntry(dn: str, attributes: list) -> None:
            for name, values in attributes:
                if name.lower() == wanted and len(names) < MAX_KNOWN:
                    names.update(v.decode("utf-8", "replace").lower() for v in values)

        done = await self._searches.run(lambda conn: conn.search(
            self.base, client.SCOPES["sub"], pureldap.LDAPFilter_present(self.attribute.encode("utf-8")),
            [self.attribute], onEntry=onEntry, sizeLimit=MAX_KNOWN, pageSize=PAGE))
        if done.resultCode not in (0, 4):
            raise done.error()
        self._known = names
        self._knownAt = self.reactor.seconds()
        self._nextRefresh = self._knownAt + REFRESH
        self._fine()


class LocalDirectory:
    """An L{netsvc.auth.Authenticator} over this daemon's C{services.ldap} directory."""

    def __init__(self, context: Any, attribute: str = "uid", timeout: float = 5.0) -> None:
        self.context = context
        self.attribute = attribute
        self.timeout = timeout
        self._warned = False

    def _directory(self) -> Any:
        directory = getattr(self.context, "directory", None)
        if directory is None and not self._warned:
            log.error("users: {{directory: true}} but there is no services.ldap directory: every check fails")
            self._warned = True
        return directory

    def isReserved(self, user: str) -> bool:
        directory = self._directory()
        return directory is not None and directory.findUser(user, self.attribute) is not None

    def check(self, user: str, password: str, client: Any = None) -> defer.Deferred:
        """L{netsvc.auth.Authenticator.check}: a bool, or L{Refused} when the hashing pool is full."""
        directory = self._directory()
        if directory is None or not password:
            return defer.succeed(False)
        entry = directory.findUser(user, self.attribute)
        # An unknown user is checked against no entry: the directory spends on it what a wrong password
        # costs (a dummy of its most common scheme, on the same path).
        d = defer.maybeDeferred(directory.checkPassword, entry.dn if entry is not None else _NO_SUCH_DN, password)
        d.addTimeout(self.timeout, self.context.reactor)
        d.addCallback(lambda ok: ok if isinstance(ok, Refused) else bool(ok) and entry is not None)
        return d.addErrback(lambda f: (log.failure("checking a password for {user}", f, user=user), False)[1])


def authenticatorFor(source: Any, context: Any, key: str = "users") -> Any:
    """
    The authenticator for an C{ldap:} or C{directory:} L{netsvc.auth.UserSource}.

    @raise netsvc.runtime.StartupError: the bind password file or CA file cannot be used, TLS
        options that contradict the URL, or C{directory: true} without services.ldap.
    """
    from netsvc.config import Problem
    from netsvc.runtime import StartupError
    from netsvc.tls import CertificateError, clientCreator

    if source.kind == "directory":
        services = getattr(getattr(context, "settings", None), "services", None)
        if services is not None and not getattr(services.get("ldap"), "enabled", False):
            raise StartupError([Problem(context.configFile, key, "users: {directory: true} needs services.ldap")])
        return LocalDirectory(context, source.attribute, source.timeout)
    if source.kind != "ldap":
        raise ValueError(f"not an LDAP user source: {source.kind}")
    try:
        url = client.parseURL(source.ldap)
    except ValueError as e:
        raise StartupError([Problem(context.configFile, f"{key}.ldap", str(e))]) from None
    if url.tls and source.starttls:
        raise StartupError([Problem(context.configFile, f"{key}.starttls",
                                    "ldaps:// is TLS already: starttls goes with ldap://")])
    if source.cacert and not (url.tls or source.starttls):
        raise StartupError([Problem(context.configFile, f"{key}.cacert",
                                    "only used with starttls: true or an ldaps:// URL")])
    cacert = str(context.settings.path(source.cacert)) if source.cacert else None
    if cacert and (url.tls or source.starttls):
        try:
            clientCreator(url.host, cafile=cacert)
        except CertificateError as e:
            raise StartupError([Problem(context.configFile, f"{key}.cacert", str(e))]) from None
    password = ""
    if source.bind_password_file:
        path = context.settings.path(source.bind_password_file)
        try:
            from netsvc.ldap.clientcli import readPasswordFile

            password = readPasswordFile(str(path))
        except (OSError, UnicodeError) as e:
            raise StartupError([Problem(context.configFile, f"{key}.bind_password_file",
                                        f"cannot read {path}: {getattr(e, 'strerror', None) or e}")]) from None
    authenticator = RemoteDirectory(context.reactor, url, source.base, source.attribute, source.starttls, cacert,
                                    source.bind_dn, password, source.timeout)
    context.reactor.callWhenRunning(authenticator.refresh)
    return authenticator
