"""
Reserved nicknames from a password file (off unless C{auth.password_file} is set).

File format, one per line (C{#} comments)::

    alice:scrypt:<salt hex>:<key hex>

Make a line with C{python -m netsvc.chat.auth NICK} (asks for the password).
The file is re-read when it changes.  scrypt is deliberately slow, so checks run
in a thread (C{deferToThread}), never on the reactor.
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import os
import sys
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.logger import Logger

log = Logger()

SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


def hashPassword(password: str, salt: bytes | None = None) -> str:
    """The C{scrypt:<salt>:<key>} form of C{password}."""
    salt = os.urandom(16) if salt is None else salt
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, **SCRYPT)
    return f"scrypt:{salt.hex()}:{key.hex()}"


def verifyPassword(password: str, stored: str) -> bool:
    try:
        scheme, salt, key = stored.split(":")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(key)
        got = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), **SCRYPT)
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


class PasswordFile:
    """A L{netsvc.chat.hub.NickAuthority} over a password file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._entries: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except OSError as e:
            log.error("chat: cannot read password file {path}: {error}", path=str(self.path), error=e.strerror)
            return
        if mtime == self._mtime:
            return
        entries = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            nick, sep, stored = line.partition(":")
            if not sep or not nick:
                log.warn("chat: {path}:{n}: expected nick:scrypt:salt:key", path=str(self.path), n=n)
                continue
            entries[nick.lower()] = stored
        self._entries, self._mtime = entries, mtime

    def isReserved(self, nick: str) -> bool:
        self._load()
        return nick.lower() in self._entries

    def check(self, nick: str, password: str):
        """Fires with True when C{password} is C{nick}'s."""
        stored = self._entries.get(nick.lower(), "")
        return deferToThread(verifyPassword, password, stored)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m netsvc.chat.auth NICK   (prints a password file line)")
    print(f"{sys.argv[1]}:{hashPassword(getpass.getpass(f'password for {sys.argv[1]}: '))}")
