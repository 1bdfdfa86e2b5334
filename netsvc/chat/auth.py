"""
Reserved nicknames from a password file (off unless C{auth.password_file} is set).

File format, one per line (C{#} comments): C{alice:scrypt:<salt hex>:<key hex>}, or
any hash L{netsvc.auth.verifyPassword} understands.  The file is a users file of
L{netsvc.auth}; this module keeps the name chat has always used for it.

Make a line with C{python -m netsvc.chat.auth NICK} (asks for the password).
"""

from __future__ import annotations

import sys

from netsvc.auth import UsersFile, _main, hashPassword, verifyPassword

#: A L{netsvc.chat.hub.NickAuthority} over a users file.
PasswordFile = UsersFile

__all__ = ["PasswordFile", "hashPassword", "verifyPassword"]

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m netsvc.chat.auth NICK   (prints a password file line)")
    sys.exit(_main(sys.argv[1:]))
