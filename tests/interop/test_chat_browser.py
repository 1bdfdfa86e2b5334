"""
Chat in a real browser: headless Chromium (Debian's, driven by selenium through
chromedriver) opens the /chat page, and a browser user and a TCP client see each
other's messages.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest
from twisted.web import resource, server

from netsvc.chat.web import chatResource
from tests.chat.test_service import readUntil
from tests.helpers import port, startDaemon

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def requireBrowser() -> None:
    for program, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not shutil.which(program):
            raise unittest.SkipTest(f"{program} not found: install with scripts/install-test-peers "
                                    f"(Debian package {package})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise unittest.SkipTest("selenium not installed: pip install '.[test]' (make test does)") from None


def startBrowser(profile: str):
    """Headless Chromium, offline: no background traffic toward the closed network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium-manager look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    return driver


def waitForText(driver, text: str, timeout: float = 10.0) -> str:
    """Wait until the chat log shows C{text}; return the log's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: text in d.find_element(By.ID, "log").text)
    return driver.find_element(By.ID, "log").text


def say(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "text")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


class BrowserChatTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        requireBrowser()
        self.daemon = startDaemon(self, 'services:\n  chat:\n    listen: ["tcp:0:interface=127.0.0.1"]\n')
        root = resource.Resource()
        root.putChild(b"chat", chatResource(self.daemon.context))
        self.web = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.addCleanup(self.web.stopListening)

    @defer.inlineCallbacks
    def test_browserUserAndTCPClientSeeEachOther(self):
        profile = Path(self.mktemp()).absolute()
        profile.mkdir(parents=True)
        # selenium blocks: it runs in a thread while the reactor serves the page and the socket
        driver = yield threads.deferToThread(startBrowser, str(profile))
        self.addCleanup(lambda: threads.deferToThread(driver.quit))
        url = f"http://127.0.0.1:{self.web.getHost().port}/chat/"
        yield threads.deferToThread(driver.get, url)
        yield threads.deferToThread(waitForText, driver, "welcome to netsvc chat")

        tcp = socket.create_connection(("127.0.0.1", port(self.daemon, 0, "chat")), timeout=5)
        self.addCleanup(tcp.close)
        tcp.sendall(b"/nick terminal\nhello from a terminal\n")
        shown = yield threads.deferToThread(waitForText, driver, "hello from a terminal")
        self.assertIn("terminal", shown)

        yield threads.deferToThread(say, driver, "/nick browser")
        yield readUntil(tcp, b"is now known as browser\n", timeout=10)
        yield threads.deferToThread(say, driver, "hello from Chromium ✓")
        got = yield readUntil(tcp, "<browser> hello from Chromium ✓\n".encode(), timeout=10)
        self.assertIn("<browser> hello from Chromium ✓\n".encode(), got)
        shown = yield threads.deferToThread(waitForText, driver, "hello from Chromium ✓")
        self.assertIn("browser", shown)  # the browser sees its own message, like everyone in the room
