"""
Reserved nicknames from a password file (off unless C{auth.password_file} is set).

File format, one per line (C{#} comments): C{alice:scrypt:<salt hex>:<key hex>}, or
any hash L{netsvc.auth.verifyPassword} understands.  The file is a users file of
L{netsvc.auth}; this module keeps the name chat has always used for it.  Its
checks are hashed in L{netsvc.auth.hashPool} (never the reactor's default pool);
L{limited} puts chat's wrong-password limit in front of any authority.

Make a line with C{python -m netsvc.chat.auth NICK} (asks for the password).
"""

from __future__ import annotations

import sys
from typing import Any

from netsvc.auth import FailureLimit, Limited, UsersFile, _main, hashPassword, verifyPassword

#: A L{netsvc.chat.hub.NickAuthority} over a users file.
PasswordFile = UsersFile

#: Wrong nickname passwords allowed per client address: a burst, then one per 10 s.
FAILURE_BURST = 5
FAILURE_RATE = 0.1

__all__ = ["FAILURE_BURST", "FAILURE_RATE", "PasswordFile", "hashPassword", "limited", "verifyPassword"]


def limited(authority: Any, clock: Any, registry: Any = None) -> Limited:
    """
    C{authority} (a L{PasswordFile} or any L{netsvc.auth.Authenticator}) behind
    chat's L{FailureLimit}: C{check(nick, password, client=address)} answers
    L{netsvc.auth.Refused}C{("rate")} (falsy) without hashing once the client
    failed L{FAILURE_BURST} times; refusals are counted in C{registry}
    (C{netsvc_password_checks_refused_total{service="chat"}}).
    """
    return Limited(authority, FailureLimit(clock, rate=FAILURE_RATE, burst=FAILURE_BURST,
                                           registry=registry, service="chat"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m netsvc.chat.auth NICK   (prints a password file line)")
    sys.exit(_main(sys.argv[1:]))
