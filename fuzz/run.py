"""
Run one fuzz target coverage-guided: C{python fuzz/run.py TARGET [--seconds N]}.

With atheris installed (C{pip install -e '.[fuzz]'}) this is libFuzzer over the
instrumented netsvc code, starting from C{tests/corpus/TARGET/} (new interesting
inputs are added to a work folder, not to the kept corpus).  Without atheris, a
mutation loop over the corpus (flip, cut, insert, duplicate), bounded by the same
time.  Either way a crash or broken invariant stops the run, prints the input as
a Python bytes literal and writes it to C{crash-<sha1>} in the current folder.

Memory is bounded (C{--rss-mb}, default 2048) and so is time (C{--seconds}).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz.targets import TARGETS  # noqa: E402


def _report(data: bytes) -> None:
    name = f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
    Path(name).write_bytes(data)
    print(f"\ncrashing input ({len(data)} bytes), written to {name}:\n{data!r}", file=sys.stderr)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        pos = rng.randrange(len(buf)) if buf else 0
        if kind == 0 and buf:
            buf[pos] = rng.randrange(256)
        elif kind == 1:
            del buf[pos:]
        elif kind == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 3:
            buf[pos:pos] = buf[pos:pos + rng.randint(1, 64)]
        elif buf:
            del buf[pos:pos + rng.randint(1, 4)]
    return bytes(buf)


def mutationLoop(fn, corpus: list[bytes], seconds: float, seed: int) -> int:
    rng = random.Random(seed)
    pool = list(corpus) or [b""]
    end = time.monotonic() + seconds
    runs = 0
    while time.monotonic() < end:
        data = _mutate(rng, rng.choice(pool))
        try:
            fn(data)
        except Exception:
            traceback.print_exc()
            _report(data)
            return 1
        runs += 1
        if rng.random() < 0.01 and len(pool) < 1000:
            pool.append(data)
    print(f"{runs} inputs in {seconds:.0f}s, no crash", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory bound (default 2048 MB)")
    p.add_argument("--no-atheris", action="store_true", help="the plain mutation loop even with atheris")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    fn = TARGETS[args.target]
    corpusDir = HERE.parent / "tests" / "corpus" / args.target
    corpus = [f.read_bytes() for f in sorted(corpusDir.iterdir())] if corpusDir.is_dir() else []
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        atheris = None
    if atheris is None or args.no_atheris:
        limit = args.rss_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit * 2, limit * 2))
        return mutationLoop(fn, corpus, args.seconds, args.seed)

    def one(data: bytes) -> None:
        try:
            fn(data)
        except Exception:
            _report(data)
            raise

    work = tempfile.mkdtemp(prefix=f"netsvc-fuzz-{args.target}-")
    for i, data in enumerate(corpus):
        (Path(work) / f"seed-{i}").write_bytes(data)
    # The targets import what they test lazily: running each seed once here imports those
    # netsvc modules under instrumentation (instrument_all() would take minutes on Twisted).
    with atheris.instrument_imports(include=["netsvc"]):
        for data in corpus:
            try:
                fn(data)
            except Exception:
                pass
    atheris.Setup([sys.argv[0], work, f"-max_total_time={int(args.seconds)}", f"-rss_limit_mb={args.rss_mb}",
                   f"-seed={args.seed}", "-print_final_stats=1"], one)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
