"""
Every fuzz target of L{fuzz.targets} as a derandomised hypothesis test (the same
examples every run: mutations of the target's corpus, and arbitrary bytes), and
every file of its corpus (seeds, and the minimised crashes kept there) replayed.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "corpus"

#: Examples per target: the whole package stays well under a minute on two cores.
EXAMPLES = {"http_request": 300, "smtp_session": 300, "dns_stream": 300, "config_yaml": 300}
DEFAULT_EXAMPLES = 500


def seeds(name: str) -> list[bytes]:
    folder = CORPUS / name
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


def mutated(corpus: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with a few byte-level mutations (flip, cut, insert, delete, duplicate)."""

    @st.composite
    def build(draw):
        data = bytearray(draw(st.sampled_from(corpus)))
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "dup"]))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if kind == "flip" and data:
                data[pos] = draw(st.integers(0, 255))
            elif kind == "cut":
                del data[pos:]
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif kind == "dup":
                data[pos:pos] = data[pos:pos + draw(st.integers(1, 64))]
            elif data:
                del data[pos:pos + draw(st.integers(1, 4))]
        return bytes(data)

    return build()


def inputs(name: str) -> st.SearchStrategy[bytes]:
    corpus = seeds(name)
    arbitrary = st.binary(max_size=512)
    return st.one_of(mutated(corpus), arbitrary) if corpus else arbitrary


def _make(name: str):
    fn = TARGETS[name]

    @settings(derandomize=True, max_examples=EXAMPLES.get(name, DEFAULT_EXAMPLES), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(inputs(name))
    def test(self, data: bytes) -> None:
        fn(data)

    def replay(self) -> None:
        for data in seeds(name):
            fn(data)

    test.__name__ = f"test_{name}"
    replay.__name__ = f"test_{name}_corpus"
    return test, replay


class FuzzTargetTests(unittest.TestCase):
    def test_everyTargetHasACorpus(self):
        for name in TARGETS:
            self.assertTrue(seeds(name), f"tests/corpus/{name}/ is empty")


for _name in TARGETS:
    _test, _replay = _make(_name)
    setattr(FuzzTargetTests, _test.__name__, _test)
    setattr(FuzzTargetTests, _replay.__name__, _replay)
