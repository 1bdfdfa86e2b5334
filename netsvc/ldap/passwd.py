"""
The password modify extended operation (RFC 3062, what C{ldappasswd} sends), for
a writable directory: a bound user changes their own C{userPassword}; writers
may change anyone's.  A mixin of L{netsvc.ldap.server.LDAPServerProtocol} (it uses
C{self.factory}, C{self.write}, C{self.boundDN}, and the protocol's wait-for-a-
check mechanism, C{self.hold()}/C{self.release()}).

    PasswdModifyRequestValue ::= SEQUENCE {
        userIdentity [0] OCTET STRING OPTIONAL,   -- a DN; absent: the bound user
        oldPasswd    [1] OCTET STRING OPTIONAL,   -- checked when given
        newPasswd    [2] OCTET STRING OPTIONAL }  -- absent: the server makes one
    PasswdModifyResponseValue ::= SEQUENCE { genPasswd [0] OCTET STRING OPTIONAL }

The new password is stored as C{{SSHA}} (slapd's default C{password-hash}), saved
like any write (L{netsvc.ldap.writes}).
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import defer

from netsvc import auth
from netsvc.ldap import codec
from netsvc.ldap.codec import BERError, ModifyRequest
from netsvc.ldap.dn import DNError, normalizeDN
from netsvc.ldap.resultcodes import (
    BUSY,
    INSUFFICIENT_ACCESS,
    INVALID_CREDENTIALS,
    NO_SUCH_OBJECT,
    OTHER,
    PROTOCOL_ERROR,
    SUCCESS,
    UNWILLING,
)
from netsvc.ldap.writes import WriteError, isWriter


def decodeValue(value: bytes | None) -> tuple[str | None, str | None, str | None]:
    """(userIdentity, oldPasswd, newPasswd) of a request value; raises L{BERError}."""
    out: list[str | None] = [None, None, None]
    if not value:
        return out[0], out[1], out[2]
    tag, start, end = codec.header(value, 0, len(value))
    if tag != 0x30 or end != len(value):
        raise BERError("not a SEQUENCE")
    pos = start
    while pos < end:
        t, s, e = codec.header(value, pos, end)
        if t not in (0x80, 0x81, 0x82):
            raise BERError(f"unexpected tag 0x{t:02x}")
        try:
            out[t - 0x80] = value[s:e].decode("utf-8")
        except UnicodeDecodeError:
            raise BERError("not UTF-8") from None
        pos = e
    return out[0], out[1], out[2]


class PasswordOperations:
    factory: Any
    boundDN: str | None

    def write(self, data: bytes) -> None:  # provided by the protocol
        raise NotImplementedError

    def hold(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def passwordModify(self, msg: codec.Message) -> None:
        factory = self.factory

        def answer(code: int, text: str = "", value: bytes | None = None) -> None:
            extra = codec.tlv(0x8B, value) if value is not None else b""
            self.write(codec.result(msg.id, codec.EXTENDED_RESPONSE, code, text, extra=extra))

        if factory.store is None:
            return answer(UNWILLING, "the directory is read-only (served from LDIF files)")
        if self.boundDN is None:
            return answer(UNWILLING, "only authenticated users may change passwords")
        try:
            user, old, new = decodeValue(msg.op.value)
            target = normalizeDN(user) if user else self.boundDN
        except (BERError, DNError) as e:
            return answer(PROTOCOL_ERROR, f"bad password modify request: {e}")
        entry = factory.directory.entries.get(target)
        if entry is None:
            return answer(NO_SUCH_OBJECT)
        if target != self.boundDN and not isWriter(factory.directory, self.boundDN, factory.limits.writers):
            return answer(INSUFFICIENT_ACCESS, "only writers may change other users' passwords")
        generated = new is None
        password = secrets.token_urlsafe(12) if generated else new

        def change(ok: bool) -> Any:
            if isinstance(ok, auth.Refused):
                return answer(BUSY, "too many password checks in progress; try again later")
            if not ok:
                return answer(INVALID_CREDENTIALS, "the old password does not match")
            stored = auth.hashPassword(password, "ssha")
            saving = factory.store.submit(ModifyRequest(entry.dn, [(2, "userPassword", [stored.encode()])]))

            def saved(_: None) -> None:
                factory.metrics.writes.inc()
                value = codec.tlv(0x30, codec.tlv(0x80, password.encode())) if generated else None
                answer(SUCCESS, value=value)

            def refused(f: Any) -> None:
                e = f.value if f.check(WriteError) else WriteError(OTHER, "internal error")
                answer(e.code, e.text)

            return saving.addCallbacks(saved, refused)

        # the old password is checked, and the new one saved, off the reactor: later requests wait
        d = defer.succeed(True) if old is None else factory.directory.checkPassword(entry.dn, old)
        d.addCallback(change)
        if not d.called:
            self.hold()
            d.addBoth(lambda _: self.release())
