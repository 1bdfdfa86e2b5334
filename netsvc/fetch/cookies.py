"""
The C{netsvc fetch --cookie-jar} file: L{CurlCookieJar}, the Netscape format as
curl reads and writes it.
"""

from __future__ import annotations

import os
import time
from http.cookiejar import MozillaCookieJar
from typing import Any


class CurlCookieJar(MozillaCookieJar):
    """
    A Netscape cookie file as curl writes and reads it, session cookies included:
    the standard library writes their expiry as an empty field (curl skips the
    line) and reads curl's 0 as long expired; it also drops the C{#HttpOnly_} mark.
    """

    def load(self, filename: Any = None, ignore_discard: bool = True, ignore_expires: bool = False) -> None:
        super().load(filename, ignore_discard=True, ignore_expires=True)
        now = time.time()
        for cookie in list(self):
            if cookie.expires == 0:
                cookie.expires, cookie.discard = None, True
            elif not ignore_expires and cookie.is_expired(now):
                self.clear(cookie.domain, cookie.path, cookie.name)

    def save(self, filename: Any = None, ignore_discard: bool = True, ignore_expires: bool = False) -> None:
        now = time.time()
        lines = ["# Netscape HTTP Cookie File\n# Written by netsvc fetch; curl -b/-c read it too.\n\n"]
        for c in self:
            if not ignore_expires and c.is_expired(now):
                continue
            httpOnly = any(c.has_nonstandard_attr(n) for n in ("HttpOnly", "HTTPOnly", "httponly"))
            domain = ("#HttpOnly_" if httpOnly else "") + c.domain
            name, value = (c.name, c.value) if c.value is not None else ("", c.name)
            fields = [domain, "TRUE" if c.domain.startswith(".") else "FALSE", c.path,
                      "TRUE" if c.secure else "FALSE", str(c.expires or 0), name, value]
            lines.append("\t".join(fields) + "\n")
        fd = os.open(filename or self.filename, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(lines))
