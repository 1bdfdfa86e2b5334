"""
C{netsvc ldap}: search, whoami, compare and hash, in the manner of OpenLDAP's
ldapsearch, ldapwhoami, ldapcompare and slappasswd.

    netsvc ldap search -x -H ldap://127.0.0.1:3389 -b ou=users,dc=example,dc=com '(objectClass=person)' cn sn
    netsvc ldap search -H ldap://127.0.0.1:3389 -ZZ --cacert var/tls/selfsigned.pem \\
        -D uid=alice,ou=users,dc=example,dc=com -w secret -b dc=example,dc=com -E pr=100 uid=alice
    netsvc ldap search -H ldaps://127.0.0.1:3636 --cacert CA.pem -b dc=example,dc=com -s one --json
    netsvc ldap whoami -H ldap://127.0.0.1:3389 -D uid=alice,ou=users,dc=example,dc=com -y pwfile
    netsvc ldap compare -H ldap://127.0.0.1:3389 uid=alice,ou=users,dc=example,dc=com sn:Liddell
    echo secret | netsvc ldap hash [--scheme ssha|scrypt]

Output: LDIF (RFC 2849: base64 for unsafe values, folded at 78 columns; C{-o
ldif-wrap=no} or C{=N} to change) as C{ldapsearch -LLL} prints it, or C{--json}
(one object per line: C{{"dn": ..., "attributes": {"cn": ["..."]}}}, values that
are not UTF-8 as C{{"base64": "..."}}).

Exit status, as ldapsearch's: the LDAP result code (0 success, 4 size limit
exceeded, 32 no such object, 49 invalid credentials...; compare: 6 true, 5 false),
1 when no LDAP answer came (connection refused, timeout, TLS refused), 2 for bad usage.
C{-Z} and C{-ZZ} both require StartTLS to succeed (never a silent fallback to clear text).
C{--cacert} defaults to C{$LDAPTLS_CACERT}, as for OpenLDAP's tools.
A password file (C{-y}) is read whole, less one trailing newline.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import sys
from typing import Any

from twisted.internet import defer

from netsvc.ldap import client
from netsvc.ldap.filtertext import FilterError, parseFilter
from netsvc.ldap.ldifout import WIDTH, entryLDIF

EXIT_LOCAL, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """Bad arguments: exit 2 with the message."""


def fail(what: str, reason: Any, status: int = EXIT_LOCAL, err: Any = None) -> int:
    """Print C{netsvc ldap: WHAT: REASON} and return C{status}."""
    (err or sys.stderr).write(f"netsvc ldap: {what}: {reason}\n")
    return status


def readPasswordFile(path: str) -> str:
    """The password in C{path}: the whole file less one trailing newline. Raises OSError/UnicodeError."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text[:-1] if text.endswith("\n") else text


# -- option parsing ----------------------------------------------------------------


def _addConnection(p: argparse.ArgumentParser) -> None:
    p.add_argument("-H", dest="url", default="ldap://localhost", metavar="URL",
                   help="ldap://host:port or ldaps://host:port (default ldap://localhost)")
    p.add_argument("-Z", dest="starttls", action="count", default=0,
                   help="StartTLS, certificate verified (-Z and -ZZ both require it to succeed)")
    p.add_argument("--cacert", metavar="FILE",
                   help="trust the CA certificate(s) in FILE (TLS and StartTLS; default $LDAPTLS_CACERT)")
    p.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    p.add_argument("-x", dest="simple", action="store_true", help="simple authentication (the only kind)")
    p.add_argument("-D", dest="binddn", default="", metavar="DN", help="bind as DN")
    p.add_argument("-w", dest="password", metavar="PASSWORD", help="the bind password")
    p.add_argument("-W", dest="prompt", action="store_true", help="ask for the bind password")
    p.add_argument("-y", dest="passwordFile", metavar="FILE", help="read the bind password from FILE")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="network timeout for each operation (default 10)")


def _checkConnection(args: argparse.Namespace) -> None:
    """Parse the URL and find the password; raises UsageError."""
    try:
        args.ldapURL = client.parseURL(args.url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.starttls and args.ldapURL.tls:
        raise UsageError("-Z (StartTLS) goes with ldap://, not ldaps://")
    if (args.cacert or args.insecure) and not (args.starttls or args.ldapURL.tls):
        raise UsageError("--cacert and --insecure go with -ZZ or ldaps://")
    if args.cacert is None and not args.insecure and (args.starttls or args.ldapURL.tls):
        args.cacert = os.environ.get("LDAPTLS_CACERT") or None  # as OpenLDAP's tools take it
    given = [o for o, v in (("-w", args.password is not None), ("-W", args.prompt), ("-y", args.passwordFile))
             if v]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)}: give the password one way")
    if given and not args.binddn:
        raise UsageError(f"{given[0]} needs -D DN")
    if args.passwordFile:
        try:
            args.password = readPasswordFile(args.passwordFile)
        except (OSError, UnicodeError) as e:
            raise UsageError(f"cannot read password file {args.passwordFile}: "
                             f"{getattr(e, 'strerror', None) or e}") from None
    elif args.prompt:
        try:
            args.password = getpass.getpass(f"Enter LDAP Password for {args.binddn}: ")
        except EOFError:
            raise UsageError("-W: no password (end of input)") from None
    if args.binddn and not args.password:
        # An empty password makes a simple bind anonymous (RFC 4513 5.1.2): refuse, as ldapsearch does.
        raise UsageError("-D needs a password (-w, -W or -y)")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")


def parseExtensions(values: list[str]) -> tuple[int, bool]:
    """C{-E pr=N[/noprompt]} (C{!pr=...}: critical) -> (page size, critical); raises UsageError."""
    pageSize, critical = 0, False
    for value in values:
        crit = value.startswith("!")
        name, _, rest = value.lstrip("!").partition("=")
        if name != "pr":
            raise UsageError(f"-E {value}: only pr=SIZE[/noprompt] (paged results) is supported")
        size, _, option = rest.partition("/")
        if not size.isdigit() or not 0 < int(size) < 2**31 or option not in ("", "noprompt", "prompt"):
            raise UsageError(f"-E {value}: expected pr=SIZE[/noprompt] with SIZE > 0")
        pageSize, critical = int(size), crit
    return pageSize, critical


def parseWrap(values: list[str]) -> int:
    """C{-o ldif-wrap=no|N} -> the fold width (0: none); raises UsageError."""
    width = WIDTH
    for value in values:
        name, _, setting = value.partition("=")
        if name != "ldif-wrap":
            raise UsageError(f"-o {value}: only ldif-wrap=no|N is supported")
        if setting == "no":
            width = 0
        elif setting.isdigit() and int(setting) >= 2:
            width = int(setting)
        else:
            raise UsageError(f"-o {value}: expected ldif-wrap=no or a width >= 2")
    return width


def _checkSearch(args: argparse.Namespace) -> None:
    _checkConnection(args)
    if args.filter is None or (not args.filter.startswith("(") and "=" not in args.filter):
        # As ldapsearch: a first argument that is no filter is the first attribute.
        args.attributes = ([args.filter] if args.filter is not None else []) + list(args.attributes)
        args.filter = "(objectClass=*)"
    try:
        args.filterObject = parseFilter(args.filter)
    except FilterError as e:
        raise UsageError(f"{args.filter}: {e}") from None
    pageSize, critical = parseExtensions(args.extensions)
    if args.pageSize:
        pageSize = args.pageSize
    if pageSize < 0 or args.sizeLimit < 0 or args.timeLimit < 0:
        raise UsageError("-z, -l and --page-size must not be negative")
    args.pages, args.criticalPaging = pageSize, critical
    args.width = parseWrap(args.options)
    args.scopeValue = client.SCOPES[args.scope]


# -- output ------------------------------------------------------------------------


class LDIFWriter:
    def __init__(self, out: Any, width: int = WIDTH) -> None:
        self.out = out
        self.width = width

    def entry(self, dn: str, attributes: list) -> None:
        self.out.write(entryLDIF(dn, attributes, self.width))
        self.out.flush()


class JSONWriter:
    def __init__(self, out: Any) -> None:
        self.out = out

    def entry(self, dn: str, attributes: list) -> None:
        record = {"dn": dn, "attributes": {name: [_jsonValue(v) for v in values] for name, values in attributes}}
        self.out.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.out.flush()


def _jsonValue(value: bytes) -> Any:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}
    return text


# -- commands ------------------------------------------------------------------------


@defer.inlineCallbacks
def _session(reactor: Any, args: argparse.Namespace, err: Any) -> Any:
    """Connect (+StartTLS) and bind as the options say; fires (connection, None) or (None, exit status)."""
    url = args.ldapURL
    try:
        conn = yield client.connect(reactor, url, starttls=bool(args.starttls), cacert=args.cacert,
                                    insecure=args.insecure, timeout=args.timeout)
    except client.StartTLSError as e:
        return None, fail(f"{'StartTLS' if args.starttls else 'TLS'} with {url}", e, err=err)
    except Exception as e:
        return None, fail(f"connect to {url}", client.describe(e, url.host), err=err)
    if args.binddn:
        try:
            yield conn.bind(args.binddn, args.password)
        except client.LDAPError as e:
            conn.unbind()
            return None, fail(f"bind as {args.binddn} to {url}", e, e.resultCode, err=err)
        except Exception as e:
            return None, fail(f"bind as {args.binddn} to {url}", client.describe(e, url.host), err=err)
    return conn, None


def _wrap(command: Any) -> Any:
    """Usage errors exit 2; connection failures in the middle of an operation exit 1."""

    def run(reactor: Any, args: argparse.Namespace, out: Any = None, err: Any = None) -> defer.Deferred:
        err = err or sys.stderr
        try:
            return command(reactor, args, out or sys.stdout.buffer, err)
        except UsageError as e:
            return defer.succeed(fail(args.command, e, EXIT_USAGE, err=err))

    run.__doc__ = command.__doc__
    return run


def _search(reactor: Any, args: argparse.Namespace, out: Any, err: Any) -> defer.Deferred:
    """C{netsvc ldap search}: print the entries; exit with the search's result code."""
    _checkSearch(args)
    writer = JSONWriter(out) if args.json else LDIFWriter(out, args.width)
    return defer.ensureDeferred(_searchSession(reactor, args, writer, err))


async def _searchSession(reactor: Any, args: argparse.Namespace, writer: Any, err: Any) -> int:
    conn, status = await _session(reactor, args, err)
    if conn is None:
        return status
    what = f"search {args.base or '(root DSE)'} at {args.ldapURL}"
    try:
        done = await conn.search(args.base, args.scopeValue, args.filterObject, args.attributes or [],
                                 onEntry=writer.entry, sizeLimit=args.sizeLimit, timeLimit=args.timeLimit,
                                 typesOnly=args.typesOnly, pageSize=args.pages, criticalPaging=args.criticalPaging,
                                 derefAliases=client.DEREF[args.deref])
    except BrokenPipeError:
        _quietStdout()  # the reader (| head) has all it wanted; no traceback at exit
        return EXIT_LOCAL
    except OSError as e:
        return fail(f"{what}: writing the output", e.strerror or e, err=err)
    except Exception as e:
        return fail(what, client.describe(e, args.ldapURL.host), err=err)
    finally:
        conn.unbind()
    for reference in done.references:
        err.write(f"netsvc ldap: {what}: referral to {reference}\n")
    if done.resultCode:
        matched = f" (matched: {done.matchedDN})" if done.matchedDN else ""
        return fail(what, f"{done.error()}{matched}", done.resultCode, err=err)
    return 0


def _quietStdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _whoami(reactor: Any, args: argparse.Namespace, out: Any, err: Any) -> defer.Deferred:
    """C{netsvc ldap whoami}: print the authorization identity (C{anonymous} for none)."""
    _checkConnection(args)
    return defer.ensureDeferred(_whoamiSession(reactor, args, out, err))


async def _whoamiSession(reactor: Any, args: argparse.Namespace, out: Any, err: Any) -> int:
    conn, status = await _session(reactor, args, err)
    if conn is None:
        return status
    try:
        identity = await conn.whoami()
    except client.LDAPError as e:
        return fail(f"whoami at {args.ldapURL}", e, e.resultCode, err=err)
    except Exception as e:
        return fail(f"whoami at {args.ldapURL}", client.describe(e, args.ldapURL.host), err=err)
    finally:
        conn.unbind()
    out.write((identity or "anonymous").encode("utf-8") + b"\n")
    return 0


def parseAssertion(text: str) -> tuple[str, bytes]:
    """C{attr:value} or C{attr::base64} (as ldapcompare takes it); raises UsageError."""
    attribute, sep, value = text.partition(":")
    if not sep or not attribute:
        raise UsageError(f"{text!r}: expected attr:value or attr::base64value")
    if value.startswith(":"):
        try:
            return attribute, base64.b64decode(value[1:].strip(), validate=True)
        except ValueError:
            raise UsageError(f"{text!r}: the value after '::' is not base64") from None
    return attribute, value.encode("utf-8")


def _compare(reactor: Any, args: argparse.Namespace, out: Any, err: Any) -> defer.Deferred:
    """C{netsvc ldap compare DN attr:value}: print TRUE or FALSE; exit 6 or 5."""
    _checkConnection(args)
    args.attribute, args.value = parseAssertion(args.assertion)
    return defer.ensureDeferred(_compareSession(reactor, args, out, err))


async def _compareSession(reactor: Any, args: argparse.Namespace, out: Any, err: Any) -> int:
    conn, status = await _session(reactor, args, err)
    if conn is None:
        return status
    what = f"compare {args.dn} {args.attribute} at {args.ldapURL}"
    try:
        equal = await conn.compare(args.dn, args.attribute, args.value)
    except client.LDAPError as e:
        return fail(what, e, e.resultCode, err=err)
    except Exception as e:
        return fail(what, client.describe(e, args.ldapURL.host), err=err)
    finally:
        conn.unbind()
    out.write(b"TRUE\n" if equal else b"FALSE\n")
    return 6 if equal else 5


def _hash(reactor: Any, args: argparse.Namespace, out: Any, err: Any, stdin: Any = None) -> defer.Deferred:
    """C{netsvc ldap hash}: the first line of standard input, hashed."""
    from twisted.internet.threads import deferToThread

    from netsvc.auth import hashPassword

    stdin = stdin or sys.stdin
    if stdin.isatty():
        try:
            password = getpass.getpass("New password: ")
            if password and getpass.getpass("Re-enter new password: ") != password:
                raise UsageError("the passwords do not match")
        except EOFError:
            raise UsageError("no password (end of input)") from None
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("no password on standard input")
    scheme = {"ssha": "ssha", "scrypt": "scrypt"}[args.scheme]
    d = deferToThread(hashPassword, password, scheme) if reactor is not None else defer.succeed(
        hashPassword(password, scheme))

    def show(hashed: str) -> int:
        out.write(hashed.encode("ascii") + b"\n")
        return 0

    return d.addCallback(show)


search, whoami, compare, hashCommand = _wrap(_search), _wrap(_whoami), _wrap(_compare), _wrap(_hash)


def addParser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("ldap", help="LDAP client: search, whoami, compare, hash",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = commands.add_parser("search", help="search the directory (ldapsearch)", description=(
        "Search an LDAP directory as ldapsearch does; entries are printed as LDIF (or --json). "
        "Exit status: the LDAP result code (0 success, 4 size limit exceeded, 32 no such object, ...)."))
    _addConnection(s)
    s.add_argument("-b", dest="base", default="", metavar="BASE", help="search base (default: the root DSE)")
    s.add_argument("-s", dest="scope", choices=list(client.SCOPES), default="sub", help="scope (default sub)")
    s.add_argument("-z", dest="sizeLimit", type=int, default=0, metavar="N", help="at most N entries (0: no limit)")
    s.add_argument("-l", dest="timeLimit", type=int, default=0, metavar="SECONDS",
                   help="server time limit (0: no limit)")
    s.add_argument("-A", dest="typesOnly", action="store_true", help="attribute names only")
    s.add_argument("-a", dest="deref", choices=list(client.DEREF), default="never",
                   help="dereference aliases (default never)")
    s.add_argument("-E", dest="extensions", action="append", default=[], metavar="pr=N[/noprompt]",
                   help="paged results of N entries, all pages fetched")
    s.add_argument("--page-size", dest="pageSize", type=int, default=0, metavar="N", help="same as -E pr=N")
    s.add_argument("-L", dest="ldifLevel", action="count", default=0, help="accepted for ldapsearch; output is LDIF")
    s.add_argument("-o", dest="options", action="append", default=[], metavar="ldif-wrap=no|N",
                   help=f"LDIF line folding (default {WIDTH}, as ldapsearch)")
    s.add_argument("--json", action="store_true", help="one JSON object per entry")
    s.add_argument("filter", nargs="?", help="RFC 4515 filter (default (objectClass=*))")
    s.add_argument("attributes", nargs="*", metavar="ATTRIBUTE",
                   help="attributes to return (default all user attributes; '+' operational, '1.1' none)")
    s.set_defaults(run=search)

    w = commands.add_parser("whoami", help="who the server thinks you are (ldapwhoami, RFC 4532)", description=(
        "Print the identity the server associates with this connection after the bind "
        "(dn:..., or anonymous), as ldapwhoami does."))
    _addConnection(w)
    w.set_defaults(run=whoami)

    c = commands.add_parser("compare", help="compare an attribute value (ldapcompare): exit 6 true, 5 false",
                            description=("Ask the server whether entry DN has the value in attribute attr, as "
                                         "ldapcompare does: prints TRUE (exit 6) or FALSE (exit 5)."))
    _addConnection(c)
    c.add_argument("dn", metavar="DN", help="the entry to compare, e.g. uid=alice,ou=users,dc=example,dc=com")
    c.add_argument("assertion", metavar="attr:value", help="attr:value or attr::base64value")
    c.set_defaults(run=compare)

    h = commands.add_parser("hash", help="hash a password read from standard input ({SSHA} or scrypt)",
                            description=("Print a hash of a password read from standard input (asked twice at a "
                                         "terminal, as slappasswd does), for LDIF userPassword values or users files."))
    h.add_argument("--scheme", choices=["ssha", "scrypt"], default="ssha",
                   help="ssha for LDIF userPassword (default), scrypt for users files")
    h.set_defaults(run=hashCommand)
    return p
