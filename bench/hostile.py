"""Hostile clients against every listener of netsvc: it must stay small, answer everyone, log no traceback.

Run from the repository root:

    .venv/bin/python bench/hostile.py [--seconds 4] [--attacks noread,junk,...] [--targets web.https,...]
                                      [--repo DIR] [--short]

It starts ``twistd -n netsvc`` on a copy of ``etc/netsvc.yaml`` (every port 0, its own state folder, a web
root with a 200 KB ``big.txt``, 50 TXT records on ``big.lab``, passwords for the web admin pages, SMTP AUTH,
LDAP and reserved chat nicknames) and, for each attack and each listener, in turn:

* **noread** -- 4 connections pipeline requests (``GET /big.txt``, DNS queries for ``big.lab``, LDAP
  subtree searches, ``/help``, ``NOOP``, 4 KB of echo data ...) for the whole attack and never read;
* **junk** -- 4 connections send random bytes as fast as the daemon takes them, and read what comes back;
* **slowloris** -- up to 200 connections each send one byte of a head or line that never ends, every 0.5 s;
* **connflood** -- connections opened as fast as possible (up to 1,000) and held;
* **midmessage** -- up to 400 connections each send half a request and vanish (half of them with a RST);
* **passwords** -- 8 connections try wrong passwords as fast as they are answered (SMTP AUTH, LDAP bind,
  the web admin's Basic auth, a reserved chat nickname).

Attackers come from 127.0.0.2 (per-IP limits apply to them); meanwhile one well-behaved client per service
(from 127.0.0.3) keeps making a real exchange -- an echo round trip, a page over HTTPS, a DNS answer over UDP
and TCP, a mail accepted with 250 after DATA, an LDAP search, a chat welcome, /metrics -- and its worst latency
is recorded.  The daemon's RSS is sampled every 50 ms.

Prints one markdown table on stdout: attack, listener, connections, RSS before and at its peak, growth per
attacking connection, the worst well-behaved latency (and which service), failed exchanges, tracebacks
logged, and whether the daemon was still alive.  ``--json FILE`` also writes the rows.  The trial suite runs
the short form (``tests/test_hostile.py``); the long form is this benchmark.

Every loop is bounded in count and time; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from _common import free_udp_tcp_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ATTACKER = "127.0.0.2"
#: The well-behaved clients' address: not 127.0.0.1, which the forward rules' own connections to echo come from
#: (they count against echo's per-IP limit, and would hide whether a flood through forward reaches echo's probe).
PROBER = "127.0.0.3"
PROBE_TIMEOUT = 5.0  # a probe slower than this is a failure; the table reports the worst latency anyway
PASSWORD = "right-password"


# -- BER, just enough for LDAP search and bind ---------------------------------------------


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        head = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + head + body


def ldapSearch(msgid: int, base: bytes, scope: int) -> bytes:
    request = (_tlv(0x04, base) + _tlv(0x0A, bytes([scope])) + _tlv(0x0A, b"\0") + _tlv(0x02, b"\0")
               + _tlv(0x02, b"\0") + _tlv(0x01, b"\0") + _tlv(0x87, b"objectClass") + _tlv(0x30, b""))
    return _tlv(0x30, _tlv(0x02, bytes([msgid])) + _tlv(0x63, request))


def ldapBind(msgid: int, dn: bytes, password: bytes) -> bytes:
    request = _tlv(0x02, b"\x03") + _tlv(0x04, dn) + _tlv(0x80, password)
    return _tlv(0x30, _tlv(0x02, bytes([msgid])) + _tlv(0x60, request))


def readLdapMessage(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """One LDAP message: (protocolOp tag, its body)."""
    while True:
        if len(buf) >= 2:
            n = buf[1]
            start = 2
            if n & 0x80:
                k = n & 0x7F
                if len(buf) >= 2 + k:
                    n, start = int.from_bytes(buf[2:2 + k], "big"), 2 + k
                else:
                    n = None
            if n is not None and len(buf) >= start + n:
                msg = bytes(buf[start:start + n])
                del buf[:start + n]
                # skip the messageID INTEGER
                idlen = msg[1]
                op = msg[2 + idlen:]
                return op[0], op
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


# -- DNS ----------------------------------------------------------------------------------------------


def dnsQuery(name: str, rdtype: int, qid: int = 0x4242) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", rdtype, 1)


def dnsAnswerOk(answer: bytes, qid: int) -> None:
    if len(answer) < 12 or struct.unpack("!H", answer[:2])[0] != qid:
        raise ValueError("bad DNS answer")
    rcode = answer[3] & 0x0F
    if rcode != 0:
        raise ValueError(f"DNS rcode {rcode}")


# -- connections ------------------------------------------------------------------------------------


def tlsContext(alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the harness tests robustness, not verification
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def connect(target: Target, source: str = PROBER, timeout: float = PROBE_TIMEOUT) -> socket.socket:
    sock = socket.create_connection((target.host, target.port), timeout=timeout, source_address=(source, 0))
    if target.tls:
        sock = tlsContext(target.alpn).wrap_socket(sock, server_hostname="localhost")
    return sock


def recvUntil(sock: socket.socket, buf: bytearray, predicate: Callable[[bytes], bool], limit: int = 1 << 24) -> bytes:
    while not predicate(bytes(buf)):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(buf[:80])!r}")
        buf += chunk
        if len(buf) > limit:
            raise ValueError("answer too large")
    return bytes(buf)


def smtpReply(sock: socket.socket, buf: bytearray) -> bytes:
    """One (possibly multi-line) SMTP reply; raises on a 4xx/5xx."""
    while True:
        end = buf.find(b"\r\n")
        while end < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
            end = buf.find(b"\r\n")
        line = bytes(buf[:end])
        del buf[:end + 2]
        if line[3:4] != b"-":
            return line


def httpExchange(sock: socket.socket, path: str, extra: str = "") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n".encode())
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/1.1 "):
        raise ValueError(f"not an HTTP answer: {data[:60]!r}")
    return data


# -- targets: what to send to each listener --------------------------------------------------------


@dataclass
class Target:
    name: str
    key: str  # the status.json listener key
    kind: str  # echo, http, h2, dns, chat-line, chat-nul, ldap, smtp, imap, pop3, metrics
    tls: bool = False
    alpn: list[str] | None = None
    host: str = "127.0.0.1"
    port: int = 0

    def unit(self) -> bytes:
        """One request, pipelined by the noread attack."""
        return {
            "echo": b"x" * 4096,
            "http": b"GET /big.txt HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "redirect": b"GET /big.txt HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "metrics": b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
            "dns": (lambda q: struct.pack("!H", len(q)) + q)(dnsQuery("big.lab", 16)),
            "chat-line": b"/help\n",
            "chat-nul": b"/help\0",
            "ldap": ldapSearch(1, b"dc=example,dc=com", 2),
            "smtp": b"NOOP\r\n",
            "h2": h2Requests("/big.txt", 99),
            "imap": b"a CAPABILITY\r\n",
            "pop3": b"CAPA\r\n",
        }[self.kind]

    def first(self) -> bytes:
        """What a connection sends before its first request (HTTP/2: the preface, SETTINGS and windows)."""
        return h2Preface() if self.kind == "h2" else b""

    def endless(self) -> tuple[bytes, bytes]:
        """The start of a request that never ends, and the byte that continues it (slowloris)."""
        if self.kind in ("http", "redirect", "metrics"):
            return b"GET / HTTP/1.1\r\nX-Slow: ", b"a"
        if self.kind == "dns":
            return b"\xff\xff", b"\0"
        if self.kind == "ldap":
            return b"\x30\x84\x00\x0f\x00\x00", b"\0"
        if self.kind == "chat-nul":
            return b"", b"a"
        if self.kind == "h2":
            # A SETTINGS frame announcing 16 KB of payload, sent a byte at a time.
            return h2Preface() + b"\x00\x40\x00\x04\x00\x00\x00\x00\x00", b"\x00"
        return b"", b"a"

    def probe(self) -> None:
        """One well-behaved exchange; raises if it is not answered properly."""
        PROBES[self.kind](self)


def probeEcho(t: Target) -> None:
    with connect(t) as s:
        s.sendall(b"probe\n")
        recvUntil(s, bytearray(), lambda b: b.endswith(b"probe\n"))


def probeHttp(t: Target) -> None:
    with connect(t) as s:
        httpExchange(s, "/")


def probeMetrics(t: Target) -> None:
    with connect(t) as s:
        data = httpExchange(s, "/metrics")
        if b" 200 " not in data.split(b"\r\n", 1)[0]:
            raise ValueError(data[:60])


def probeDns(t: Target) -> None:
    qid = random.randrange(1, 65535)
    query = dnsQuery("printer.lab", 1, qid)
    if t.key.endswith("[0]"):  # the UDP listener
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((PROBER, 0))
            s.settimeout(PROBE_TIMEOUT)
            s.sendto(query, (t.host, t.port))
            dnsAnswerOk(s.recv(65536), qid)
        return
    with connect(t) as s:
        s.sendall(struct.pack("!H", len(query)) + query)
        buf = bytearray()
        recvUntil(s, buf, lambda b: len(b) >= 2 and len(b) >= 2 + struct.unpack("!H", b[:2])[0])
        dnsAnswerOk(bytes(buf[2:]), qid)


def probeChat(t: Target) -> None:
    with connect(t) as s:
        recvUntil(s, bytearray(), lambda b: b"welcome" in b)


def probeLdap(t: Target) -> None:
    with connect(t) as s:
        s.sendall(ldapSearch(1, b"", 0))
        buf = bytearray()
        while readLdapMessage(s, buf)[0] != 0x65:
            pass


def probeSmtp(t: Target) -> None:
    with connect(t) as s:
        buf = bytearray()
        smtpReply(s, buf)
        for line in (b"EHLO probe.lab", b"MAIL FROM:<probe@lab.test>", b"RCPT TO:<someone@example.test>", b"DATA"):
            s.sendall(line + b"\r\n")
            reply = smtpReply(s, buf)
            if reply[:1] not in b"23":
                raise ValueError(reply)
        s.sendall(b"Subject: probe\r\n\r\nhello\r\n.\r\n")
        reply = smtpReply(s, buf)
        if not reply.startswith(b"250"):
            raise ValueError(reply)
        s.sendall(b"QUIT\r\n")


def h2Preface() -> bytes:
    """A client's first flight: the preface, SETTINGS (windows opened wide) and a connection WINDOW_UPDATE."""
    import h2.config
    import h2.connection

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({4: 2**31 - 1})
    conn.increment_flow_control_window(2**31 - 1 - 65535)
    return conn.data_to_send()


def h2Requests(path: str, count: int) -> bytes:
    """HEADERS frames asking for C{path} on C{count} streams (after L{h2Preface}; HPACK without indexing)."""
    import h2.config
    import h2.connection

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.data_to_send()
    conn.encoder.header_table_size = 0  # stateless blocks: repeating them stays valid
    out = bytearray()
    for i in range(count):
        headers = [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "localhost")]
        conn.send_headers(1 + 2 * i, headers, end_stream=True)
        out += conn.data_to_send()
    return bytes(out)


def probeH2(t: Target) -> None:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "localhost")],
                      end_stream=True)
    with connect(t) as s:
        s.sendall(conn.data_to_send())
        while True:
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed before the answer")
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    if dict(event.headers).get(b":status") != b"200":
                        raise ValueError(event.headers)
                elif isinstance(event, h2.events.StreamEnded):
                    return
            out = conn.data_to_send()
            if out:
                s.sendall(out)


def _lineReply(s: socket.socket, buf: bytearray, done: Callable[[bytes], bool]) -> bytes:
    """Lines until one satisfies C{done}; returns that line (and drops what was read)."""
    while True:
        end = buf.find(b"\r\n")
        while end < 0:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {bytes(buf[:80])!r}")
            buf += chunk
            end = buf.find(b"\r\n")
        line = bytes(buf[:end])
        del buf[:end + 2]
        if done(line):
            return line


def probeImap(t: Target) -> None:
    with connect(t) as s:
        buf = bytearray()
        _lineReply(s, buf, lambda line: line.startswith(b"* OK"))
        s.sendall(b"p1 LOGIN dev " + PASSWORD.encode() + b"\r\np2 SELECT INBOX\r\np3 LOGOUT\r\n")
        for tag in (b"p1 ", b"p2 "):
            reply = _lineReply(s, buf, lambda line, tag=tag: line.startswith(tag))
            if not reply.startswith(tag + b"OK"):
                raise ValueError(reply)


def probePop3(t: Target) -> None:
    with connect(t) as s:
        buf = bytearray()
        for send in (None, b"USER dev", b"PASS " + PASSWORD.encode(), b"STAT"):
            if send is not None:
                s.sendall(send + b"\r\n")
            reply = _lineReply(s, buf, lambda line: line[:1] in (b"+", b"-"))
            if not reply.startswith(b"+OK"):
                raise ValueError(reply)
        s.sendall(b"QUIT\r\n")


PROBES: dict[str, Callable[[Target], None]] = {
    "echo": probeEcho, "http": probeHttp, "redirect": probeHttp, "metrics": probeMetrics, "dns": probeDns,
    "chat-line": probeChat, "chat-nul": probeChat, "ldap": probeLdap, "smtp": probeSmtp, "h2": probeH2,
    "imap": probeImap, "pop3": probePop3,
}

#: (name, status.json key, kind, tls, ALPN)
TARGETS = [
    ("echo.tcp", "services.echo.listen[0]", "echo", False, None),
    ("echo.tls", "services.echo.listen[2]", "echo", True, None),
    ("forward", "services.forward.rules[0].listen[0]", "echo", False, None),
    ("chat.line", "services.chat.listen[0]", "chat-line", False, None),
    ("chat.nul", "services.chat.listen[1]", "chat-nul", False, None),
    ("chat.tls", "services.chat.listen[2]", "chat-line", True, None),
    ("web.https", "services.web.listen[0]", "http", True, ["http/1.1"]),
    ("web.h2", "services.web.listen[0]", "h2", True, ["h2"]),
    ("web.http", "services.web.listen[1]", "redirect", False, None),
    ("dns.tcp", "services.dns.listen[1]", "dns", False, None),
    ("dns.tls", "services.dns.listen[2]", "dns", True, None),
    ("ldap", "services.ldap.listen[0]", "ldap", False, None),
    ("ldaps", "services.ldap.listen[1]", "ldap", True, None),
    ("smtp", "services.smtp.listen[0]", "smtp", False, None),
    ("smtps", "services.smtp.listen[2]", "smtp", True, None),
    ("imaps", "services.mailbox.listen[1]", "imap", True, None),
    ("pop3s", "services.mailbox.listen[3]", "pop3", True, None),
    ("metrics", "metrics.listen[0]", "metrics", False, None),
]

#: The well-behaved clients, one per service (the UDP DNS listener included).
PROBE_TARGETS = ["echo.tcp", "forward", "chat.line", "web.https", "web.h2", "dns.udp", "dns.tcp", "ldap", "smtp",
                 "imaps", "pop3s", "metrics"]


# -- the daemon ----------------------------------------------------------------------------------------


def harnessConfig(tmp: Path, repo: Path) -> Path:
    """etc/netsvc.yaml with every port 0, paths made absolute, and what the attacks need."""
    sys.path.insert(0, str(repo))
    from netsvc.auth import hashPassword  # the repository's own, for the password lines

    etc = repo / "etc"
    config = yaml.safe_load((etc / "netsvc.yaml").read_text())

    def zeroPorts(node):
        if isinstance(node, str):
            return re.sub(r"^(tcp6?|udp|tls):\d+", r"\1:0", node)
        if isinstance(node, list):
            return [zeroPorts(x) for x in node]
        if isinstance(node, dict):
            return {k: (zeroPorts(v) if k in ("listen", "endpoint", "rules") or isinstance(v, (list, dict)) else v)
                    for k, v in node.items()}
        return node

    config = zeroPorts(config)
    config["state_dir"] = str(tmp / "state")
    config["drain_timeout"] = "2s"
    services = config["services"]
    # echo on a port chosen here, so that the forward rules (which connect to echo) can name it
    echoPort = free_udp_tcp_port()
    services["echo"]["listen"] = [re.sub(r"^(tcp|udp):0", rf"\1:{echoPort}", x)
                                  for x in services["echo"]["listen"] if not str(x).startswith("tcp6")]
    for rule in services["forward"]["rules"]:
        rule["connect"] = [re.sub(r"port=7007", f"port={echoPort}", c) for c in rule["connect"]]
    www = tmp / "www"
    shutil.copytree(repo / "www", www)
    (www / "big.txt").write_bytes((b"0123456789abcdef" * 64 + b"\n") * 200)  # ~200 KB
    web = services["web"]
    web["root"] = str(www)
    web["access_log"] = {"file": str(tmp / "access.log"), "format": "combined"}
    stored = hashPassword(PASSWORD)
    web["admin"] = {"allow": ["127.0.0.1/32"], "users": {"ops": stored}}
    (tmp / "users.txt").write_text(f"dev:{stored}\nroot:{stored}\n")
    services["chat"]["auth"] = {"password_file": str(tmp / "users.txt")}
    services["smtp"]["users"] = str(tmp / "users.txt")
    services["mailbox"]["users"] = str(tmp / "users.txt")
    services["ldap"]["ldif"] = [str((etc / p).resolve()) for p in services["ldap"]["ldif"]]
    dns = services["dns"]
    dns["hosts"] = []
    dns["upstreams"] = ["udp://127.0.0.1:9"]  # nothing there: the harness only asks for local names
    dns["records"] = list(dns["records"]) + [
        {"name": "big.lab", "type": "TXT", "value": f"record {i:02d} " + "x" * 180} for i in range(50)]
    path = tmp / "netsvc.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Daemon:
    def __init__(self, repo: Path, tmp: Path) -> None:
        self.tmp = tmp
        self.config = harnessConfig(tmp, repo)
        self.logPath = tmp / "daemon.log"
        env = dict(os.environ, PYTHONPATH=str(repo), PYTHONUNBUFFERED="1")
        twistd = Path(sys.executable).with_name("twistd")
        argv = [str(twistd)] if twistd.exists() else [sys.executable, "-m", "twisted.scripts.twistd"]
        self._log = open(self.logPath, "wb")
        self.proc = subprocess.Popen(argv + ["-n", "--pidfile=", "netsvc", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp),
                                     start_new_session=True)
        status = tmp / "state" / "status.json"
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"netsvc exited: {self.logPath.read_text(errors='replace')[-2000:]}")
            try:
                self.status = json.loads(status.read_text())
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError("netsvc did not write status.json in 30 s") from None
                time.sleep(0.05)
        self.listeners = {e["key"]: e for e in self.status["listeners"]}

    def target(self, name: str) -> Target:
        if name == "dns.udp":
            entry = self.listeners["services.dns.listen[0]"]
            return Target(name, "services.dns.listen[0]", "dns", port=int(entry["port"]))
        for tname, key, kind, tls, alpn in TARGETS:
            if tname == name:
                return Target(name, key, kind, tls, alpn, port=int(self.listeners[key]["port"]))
        raise KeyError(name)

    def rssMB(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logSize(self) -> int:
        return self.logPath.stat().st_size

    def tracebacks(self, since: int) -> list[str]:
        with open(self.logPath, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines()
                if "Traceback" in line or "Unhandled" in line or "[critical]" in line.lower()
                or " critical " in line.lower()]

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# -- attacks -------------------------------------------------------------------------------------------


class Stop:
    """When an attack ends: a deadline shared by its threads."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.event = threading.Event()

    def __bool__(self) -> bool:
        return self.event.is_set() or time.monotonic() >= self.deadline

    def sleep(self, seconds: float) -> None:
        self.event.wait(min(seconds, max(0.0, self.deadline - time.monotonic())))


def _attackConnect(t: Target, stop: Stop, timeout: float = 3.0) -> socket.socket | None:
    try:
        return connect(t, ATTACKER, timeout)
    except (OSError, ValueError):
        stop.sleep(0.05)
        return None


def _sendFor(sock: socket.socket, data: bytes, stop: Stop, limit: int) -> int:
    """Send C{data} repeatedly until stopped or C{limit} bytes were sent; never read."""
    sock.settimeout(0.2)
    sent = 0
    blob = data * max(1, 16384 // len(data))
    view, off = memoryview(blob), 0
    while not stop and sent < limit:
        try:
            n = sock.send(view[off:])
        except (TimeoutError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            stop.sleep(0.05)
            continue
        except OSError:
            return sent
        sent += n
        off = (off + n) % len(blob)
    return sent


def attackNoread(t: Target, stop: Stop) -> int:
    """4 connections pipeline requests and never read."""
    def one():
        s = _attackConnect(t, stop)
        if s is not None:
            with s:
                s.sendall(t.first())
                if t.kind == "h2":
                    s.sendall(t.unit())  # stream IDs may not repeat: one flight of 99 requests, then hold
                else:
                    _sendFor(s, t.unit(), stop, 64 << 20)
                stop.sleep(60)  # hold the connection (and its unread answers) until the attack ends
    return _threads(one, 4)


def attackJunk(t: Target, stop: Stop) -> int:
    """4 connections send random bytes and read (and drop) whatever comes back; reconnect when closed."""
    junk = random.Random(7).randbytes(1 << 16)

    def one():
        while not stop:
            s = _attackConnect(t, stop)
            if s is None:
                continue
            with s:
                s.settimeout(0.05)
                off = 0
                try:
                    while not stop:
                        try:
                            s.send(junk[off:off + 4096])
                            off = (off + 4096) % len(junk)
                        except (TimeoutError, ssl.SSLWantWriteError):
                            pass
                        try:
                            if not s.recv(65536):
                                break
                        except (TimeoutError, ssl.SSLWantReadError):
                            pass
                except OSError:
                    pass
    return _threads(one, 4)


def attackSlowloris(t: Target, stop: Stop) -> int:
    """Up to 200 connections, each a head or line that never ends, one byte every 0.5 s."""
    start, more = t.endless()
    socks: list[socket.socket] = []
    while not stop and len(socks) < 200:
        s = _attackConnect(t, stop, timeout=1.0)
        if s is None:
            break
        try:
            s.settimeout(0.2)
            s.send(start + more)
        except OSError:
            s.close()
            continue
        socks.append(s)
    count = len(socks)
    while not stop:
        for s in list(socks):
            try:
                s.send(more)
            except (TimeoutError, ssl.SSLWantWriteError):
                pass
            except OSError:
                socks.remove(s)
                s.close()
        stop.sleep(0.5)
    for s in socks:
        s.close()
    return count


def attackConnflood(t: Target, stop: Stop) -> int:
    """Connections opened as fast as possible (at most 1,000) and held until the end."""
    socks = []
    deadline_per = 0.5
    while not stop and len(socks) < 1000:
        try:
            raw = socket.create_connection((t.host, t.port), timeout=deadline_per, source_address=(ATTACKER, 0))
        except OSError:
            stop.sleep(0.05)
            continue
        socks.append(raw)
    count = len(socks)
    stop.sleep(60)
    for s in socks:
        s.close()
    return count


def attackMidmessage(t: Target, stop: Stop) -> int:
    """Up to 400 connections each send half a request and vanish (every other one with a RST)."""
    unit = t.unit()
    half = unit[:max(1, len(unit) // 2)]
    count = 0
    while not stop and count < 400:
        s = _attackConnect(t, stop, timeout=1.0)
        if s is None:
            continue
        count += 1
        try:
            s.settimeout(0.2)
            s.send(half)
            if count % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()
    return count


def _passwordLoop(t: Target, stop: Stop, attempt: Callable[[socket.socket, bytearray], None],
                  hello: Callable[[socket.socket, bytearray], None]) -> None:
    while not stop:
        s = _attackConnect(t, stop)
        if s is None:
            continue
        with s:
            buf = bytearray()
            try:
                s.settimeout(3.0)
                hello(s, buf)
                while not stop:
                    attempt(s, buf)
            except (OSError, ValueError, ConnectionError):
                stop.sleep(0.01)


def attackPasswords(t: Target, stop: Stop) -> int:
    """8 connections try wrong passwords, each as soon as the last one was answered."""
    if t.kind == "smtp":
        def hello(s, buf):
            smtpReply(s, buf)
            s.sendall(b"EHLO attacker\r\n")
            smtpReply(s, buf)

        def attempt(s, buf):
            s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0dev\0wrong") + b"\r\n")
            smtpReply(s, buf)
    elif t.kind == "ldap":
        def hello(s, buf):
            pass

        def attempt(s, buf):
            s.sendall(ldapBind(1, b"uid=alice,ou=users,dc=example,dc=com", b"wrong"))
            readLdapMessage(s, buf)
    elif t.kind == "http":
        def hello(s, buf):
            pass

        def attempt(s, buf):
            auth = base64.b64encode(b"ops:wrong").decode()
            s.sendall(f"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {auth}\r\n\r\n".encode())
            head = recvUntil(s, buf, lambda b: b"\r\n\r\n" in b)
            end = head.index(b"\r\n\r\n") + 4
            length = re.search(rb"(?i)content-length: *(\d+)", head[:end])
            total = end + (int(length.group(1)) if length else 0)
            recvUntil(s, buf, lambda b: len(b) >= total)
            del buf[:total]
    elif t.kind == "imap":
        def hello(s, buf):
            _lineReply(s, buf, lambda line: line.startswith(b"* OK"))

        def attempt(s, buf):
            s.sendall(b"a LOGIN dev wrong\r\n")
            _lineReply(s, buf, lambda line: line.startswith(b"a "))
    elif t.kind == "pop3":
        def hello(s, buf):
            _lineReply(s, buf, lambda line: line[:1] in (b"+", b"-"))

        def attempt(s, buf):
            s.sendall(b"USER dev\r\nPASS wrong\r\n")
            for _ in range(2):
                _lineReply(s, buf, lambda line: line[:1] in (b"+", b"-"))
    elif t.kind.startswith("chat"):
        end = b"\0" if t.kind == "chat-nul" else b"\n"

        def hello(s, buf):
            recvUntil(s, buf, lambda b: b"welcome" in b)
            buf.clear()

        def attempt(s, buf):
            s.sendall(b"/nick root wrong" + end)
            recvUntil(s, buf, lambda b: end in b)
            buf.clear()
    else:
        raise ValueError(f"no password attack on {t.name}")
    return _threads(lambda: _passwordLoop(t, stop, attempt, hello), 8)


#: The fuzz corpus (tests/corpus/TARGET/) whose seeds the mutated attack starts from, by listener kind.
_CORPUS = {"http": "http_request", "redirect": "http_request", "metrics": "http_request", "dns": "dns_stream",
           "smtp": "smtp_session", "chat-line": "chat_stream", "chat-nul": "chat_stream", "h2": "http2_frames",
           "pop3": "pop3_session"}


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few random edits (flips, cuts, insertions, duplications), as the fuzz targets' mutator makes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        pos = rng.randint(0, len(out))
        kind = rng.randrange(4)
        if kind == 0 and out:
            out[min(pos, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del out[pos:pos + rng.randint(1, 16)]
        elif kind == 2:
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        else:
            out[pos:pos] = out[pos:pos + rng.randint(1, 64)]
    return bytes(out)


def sendMutated(t: Target, rng: random.Random, count: int, moment: float = 0.05) -> list[socket.socket]:
    """
    C{count} connections to C{t}, each sending a mutated request (from the listener's own request and its
    fuzz corpus) and then going: closed at once, reset, or after reading for a C{moment}; every tenth is left
    open mid-message and returned (the caller closes them).
    """
    seeds = [t.unit()]
    corpus = REPO / "tests" / "corpus" / _CORPUS.get(t.kind, "")
    if t.kind in _CORPUS and corpus.is_dir():
        seeds += [f.read_bytes() for f in sorted(corpus.iterdir()) if f.is_file()]
    held = []
    for i in range(count):
        try:
            s = connect(t, ATTACKER, 2.0)
        except (OSError, ValueError):
            continue
        try:
            s.settimeout(moment)
            s.send(t.first() + mutate(rng, rng.choice(seeds))[:65536])
            if i % 10 == 9:
                held.append(s)
                continue
            if i % 3 == 1:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif i % 3 == 2:
                s.recv(65536)
        except (OSError, ValueError):
            pass
        s.close()
    return held


def _threads(fn: Callable[[], object], n: int) -> int:
    threads = [threading.Thread(target=fn, daemon=True) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return n


ATTACKS: dict[str, Callable[[Target, Stop], int]] = {
    "noread": attackNoread, "junk": attackJunk, "slowloris": attackSlowloris, "connflood": attackConnflood,
    "midmessage": attackMidmessage, "passwords": attackPasswords,
}
PASSWORD_TARGETS = ["smtps", "ldap", "web.https", "chat.line", "imaps", "pop3s"]


# -- one run -------------------------------------------------------------------------------------------


@dataclass
class Row:
    attack: str
    target: str
    connections: int = 0
    rssBefore: float = 0.0
    rssPeak: float = 0.0
    worstMs: float = 0.0
    worstService: str = ""
    failures: int = 0
    failed: list[str] = field(default_factory=list)
    tracebacks: int = 0
    alive: bool = True

    @property
    def growthPerConnection(self) -> float:
        return max(0.0, self.rssPeak - self.rssBefore) / max(1, self.connections)


class Probes:
    """One thread per well-behaved client, each repeating its exchange while an attack runs."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets

    def run(self, stop: Stop, row: Row) -> list[threading.Thread]:
        lock = threading.Lock()

        def loop(t: Target):
            while not stop:
                began = time.monotonic()
                try:
                    t.probe()
                    error = None
                except Exception as e:  # noqa: BLE001 -- every failure is a row entry
                    error = f"{t.name}: {type(e).__name__}: {e}"
                ms = (time.monotonic() - began) * 1000
                with lock:
                    if ms > row.worstMs:
                        row.worstMs, row.worstService = ms, t.name
                    if error is not None:
                        row.failures += 1
                        if len(row.failed) < 5:
                            row.failed.append(error)
                stop.sleep(0.1)

        threads = [threading.Thread(target=loop, args=(t,), daemon=True) for t in self.targets]
        for th in threads:
            th.start()
        return threads


def runAttack(daemon: Daemon, probes: Probes, attack: str, target: Target, seconds: float) -> Row:
    row = Row(attack, target.name)
    time.sleep(0.3)  # let the last attack's connections go
    row.rssBefore = row.rssPeak = daemon.rssMB()
    since = daemon.logSize()
    stop = Stop(seconds)
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            row.rssPeak = max(row.rssPeak, daemon.rssMB())
            sampling.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    probeThreads = probes.run(stop, row)
    try:
        row.connections = ATTACKS[attack](target, stop)
    finally:
        stop.event.set()
        for th in probeThreads:
            th.join(PROBE_TIMEOUT + 1)
        sampling.set()
        sampler.join()
    time.sleep(0.2)
    lines = daemon.tracebacks(since)
    row.tracebacks = len(lines)
    if lines:
        log(f"    log: {lines[0][:200]}")
    row.alive = daemon.alive()
    return row


def plan(attacks: list[str], targets: list[str]) -> list[tuple[str, str]]:
    out = []
    for attack in attacks:
        for name in targets:
            if attack == "passwords" and name not in PASSWORD_TARGETS:
                continue
            out.append((attack, name))
    return out


def run(seconds: float, attacks: list[str], targets: list[str], repo: Path = REPO,
        keep: Path | None = None) -> list[Row]:
    """Start the daemon, run every (attack, listener) pair for C{seconds}, stop it; the rows."""
    tmp = Path(tempfile.mkdtemp(prefix="netsvc-hostile-"))
    daemon = Daemon(repo, tmp)
    rows = []
    try:
        probes = Probes([daemon.target(n) for n in PROBE_TARGETS])
        for attack, name in plan(attacks, targets):
            if not daemon.alive():
                rows.append(Row(attack, name, alive=False))
                continue
            log(f"  {attack} -> {name}")
            row = runAttack(daemon, probes, attack, daemon.target(name), seconds)
            rows.append(row)
            if row.failed:
                log(f"    failed: {row.failed[0]}")
    finally:
        daemon.stop()
        if keep is not None:
            shutil.copy(daemon.logPath, keep)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def table(rows: list[Row]) -> str:
    out = ["| attack | listener | conns | RSS before MB | RSS peak MB | growth/conn MB | worst probe ms (service) "
           "| failed probes | tracebacks | alive |",
           "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        out.append(f"| {r.attack} | {r.target} | {r.connections} | {r.rssBefore:.0f} | {r.rssPeak:.0f} | "
                   f"{r.growthPerConnection:.2f} | {r.worstMs:.0f} ({r.worstService}) | {r.failures} | "
                   f"{r.tracebacks} | {'yes' if r.alive else '**no**'} |")
    return "\n".join(out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="each attack's duration (default 4)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated: " + ", ".join(ATTACKS))
    parser.add_argument("--targets", default=",".join(t[0] for t in TARGETS),
                        help="comma-separated listeners: " + ", ".join(t[0] for t in TARGETS))
    parser.add_argument("--repo", type=Path, default=REPO, help="the source tree whose netsvc to run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--log", type=Path, help="keep the daemon's log here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = run(args.seconds, args.attacks.split(","), args.targets.split(","), args.repo.resolve(), args.log)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))


if __name__ == "__main__":
    main()
