"""Crashes the fuzz targets found in files fixed here, each held by a test (issue 22)."""

from __future__ import annotations

from twisted.trial import unittest

from netsvc.config import ConfigError, parse


class ConfigProblemsAreOneLineEach(unittest.TestCase):
    def problems(self, text: str) -> list[str]:
        e = self.assertRaises(ConfigError, parse, text, "f.yaml")
        return str(e).splitlines()

    def test_unreadableCharacter(self):
        """A NUL (YAML's ReaderError) was a four-line message with no key and no line."""
        self.assertEqual(self.problems("\x00ervices:\n"),
                         ["f.yaml: line 1: YAML syntax error: special characters are not allowed: '\\x00'"])
        self.assertEqual(self.problems("a: 1\nb: \x07\n"),
                         ["f.yaml: line 2: YAML syntax error: special characters are not allowed: '\\x07'"])

    def test_keyWithANewline(self):
        """A quoted key with a newline in it made one problem two lines."""
        lines = self.problems('services:\n  "ec\\nho": {}\n')
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("f.yaml: services.ec\\nho: "), lines)
