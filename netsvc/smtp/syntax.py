"""
SMTP command syntax (RFC 5321 section 4.1, with RFC 6531 SMTPUTF8 addresses):
reverse- and forward-paths, ESMTP parameters, xtext (RFC 3461).

Pure functions on bytes/str; they raise L{SyntaxProblem} carrying the reply
(code, enhanced status, text) the server should send.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.mail.smtp import xtext_decode

#: RFC 5321 4.5.3.1: local part, domain and path lengths.
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATOMS = r'[^\s"<>()\[\]\\,;:@.\x00-\x1f\x7f]+(?:\.[^\s"<>()\[\]\\,;:@.\x00-\x1f\x7f]+)*'
_QUOTED = r'"(?:[^"\\\x00-\x1f\x7f]|\\[ -~])*"'
_MAILBOX = re.compile(rf"^(?P<local>{_ATOMS}|{_QUOTED})@(?P<domain>{_ATOMS}|\[[^\]\s\\]+\])$")
_PATH_ARG = re.compile(rb"^(?P<kw>FROM|TO)\s*:\s*(?P<path><[^<>]*>|[^\s<>]+)(?P<params>(?:\s+\S+)*)\s*$",
                       re.IGNORECASE)
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")
#: A domain label (RFC 5321 4.1.2 sub-domain: letters, digits, inner hyphens; also "_", seen in real
#: host names, and non-ASCII U-label characters, for SMTPUTF8): at most 63 characters.
_LABEL = re.compile("^[A-Za-z0-9_\u0080-\U0010ffff](?:[A-Za-z0-9_\u0080-\U0010ffff-]{0,61}"
                    "[A-Za-z0-9_\u0080-\U0010ffff])?$")
_PARAM = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9-]*$")


class SyntaxProblem(ValueError):
    """Bad syntax: C{reply} is (code, enhanced code, text)."""

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(f"{code} {status} {text}")
        self.reply = (code, status, text)


def parsePathArgument(rest: bytes, keyword: str) -> tuple[str, dict[str, str | None], bool]:
    """
    Parse the argument of C{MAIL} (C{keyword="FROM"}) or C{RCPT} (C{"TO"}):
    C{FROM:<path> PARAM=VALUE ...}.

    @return: (path without brackets, {UPPERCASE PARAM: value or None}, path was ASCII)
    @raise SyntaxProblem: 501 for bad syntax, 555 for a malformed parameter.
    """
    m = _PATH_ARG.match(rest)
    if m is None or m.group("kw").upper() != keyword.encode():
        raise SyntaxProblem(501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")
    raw = m.group("path")
    if raw.startswith(b"<"):
        raw = raw[1:-1]
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SyntaxProblem(501, "5.1.7" if keyword == "FROM" else "5.1.3", "Address is not UTF-8") from None
    params: dict[str, str | None] = {}
    for item in m.group("params").split():
        key, eq, value = item.partition(b"=")
        if not _PARAM.match(key) or (eq and not value):
            raise SyntaxProblem(555, "5.5.4", f"Malformed parameter {item[:40].decode('ascii', 'replace')}")
        try:
            params[key.decode().upper()] = value.decode("utf-8") if eq else None
        except UnicodeDecodeError:
            raise SyntaxProblem(555, "5.5.4", "Parameter is not UTF-8") from None
    return path, params, raw.isascii()


def checkMailbox(path: str, sender: bool) -> str:
    """
    Validate a path's mailbox (dropping an RFC 5321 source route); return it.
    The null sender C{""} is valid for senders; C{postmaster} alone for recipients.

    @raise SyntaxProblem: 501 5.1.7 (sender) or 501 5.1.3 (recipient).
    """
    status = "5.1.7" if sender else "5.1.3"
    what = "sender" if sender else "recipient"
    path = _SOURCE_ROUTE.sub("", path)
    if path == "" and sender:
        return path
    if not sender and path.lower() == "postmaster":
        return path
    if len(path.encode()) > MAX_PATH:
        raise SyntaxProblem(501, status, f"Bad {what} address: longer than {MAX_PATH} octets")
    m = _MAILBOX.match(path)
    if m is None:
        raise SyntaxProblem(501, status, f"Bad {what} address syntax")
    if len(m.group("local").encode()) > MAX_LOCAL or len(m.group("domain").encode()) > MAX_DOMAIN:
        raise SyntaxProblem(501, status, f"Bad {what} address: local part or domain too long")
    if not validDomain(m.group("domain")):
        raise SyntaxProblem(501, status, f"Bad {what} address: invalid domain")
    return path


def validDomain(domain: str) -> bool:
    """
    A domain delivery can use: dot-separated labels (no empty label, so no trailing
    dot; no "%", "!" or "/"), or an address literal that is a real IPv4 or
    C{IPv6:} address (RFC 5321 4.1.3; no general literals, no zone index).
    """
    if domain.startswith("["):
        literal = domain[1:-1]
        if literal[:5].upper() == "IPV6:":
            literal = literal[5:]
            if "%" in literal:  # a zone index means nothing off this host
                return False
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                return False
            return True
        try:
            ipaddress.IPv4Address(literal)
        except ValueError:
            return False
        return True
    return all(_LABEL.match(label) for label in domain.split("."))


def decodeXtext(value: str) -> str:
    """RFC 3461 xtext (C{+2B} for C{+}) to text."""
    try:
        return xtext_decode(value.encode("utf-8"))[0]
    except (ValueError, UnicodeError, TypeError):  # TypeError: Twisted's decoder on a '+' not followed by hex
        raise SyntaxProblem(501, "5.5.4", "Malformed xtext") from None


def parseDSNMail(params: dict[str, str | None]) -> tuple[str | None, str | None]:
    """RET and ENVID of MAIL (RFC 3461 4.3, 4.4): (\"FULL\"|\"HDRS\"|None, envid|None)."""
    ret = params.get("RET")
    if "RET" in params and (ret is None or ret.upper() not in ("FULL", "HDRS")):
        raise SyntaxProblem(501, "5.5.4", "RET must be FULL or HDRS")
    envid = params.get("ENVID")
    if "ENVID" in params:
        if not envid or len(envid) > 100:
            raise SyntaxProblem(501, "5.5.4", "Bad ENVID")
        envid = decodeXtext(envid)
    return (ret.upper() if ret else None), envid


_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


def parseDSNRcpt(params: dict[str, str | None]) -> tuple[str | None, str | None]:
    """NOTIFY and ORCPT of RCPT (RFC 3461 4.1, 4.2): (\"SUCCESS,FAILURE\"|\"NEVER\"|None, \"rfc822;addr\"|None)."""
    notify = params.get("NOTIFY")
    if "NOTIFY" in params:
        words = [w.upper() for w in (notify or "").split(",")]
        if words == ["NEVER"]:
            notify = "NEVER"
        elif words and all(w in _NOTIFY for w in words):
            notify = ",".join(words)
        else:
            raise SyntaxProblem(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    orcpt = params.get("ORCPT")
    if "ORCPT" in params:
        kind, semi, address = (orcpt or "").partition(";")
        if not semi or not kind or not address:
            raise SyntaxProblem(501, "5.5.4", "ORCPT must be addr-type;xtext")
        orcpt = f"{kind};{decodeXtext(address)}"
    return notify, orcpt
