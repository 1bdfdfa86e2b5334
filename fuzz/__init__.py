"""
Fuzz targets for every parser that reads a stranger's bytes (issue 22).

L{fuzz.targets.TARGETS} maps a name to a function from bytes that checks the
parser's invariants (a crash or an L{AssertionError} is a finding).  Each runs:

  - in trial, derandomised (the same examples every run): C{tests/fuzz/};
  - coverage-guided for long runs, with atheris (libFuzzer) when installed
    (C{.venv/bin/pip install -e '.[fuzz]'}), else a mutation loop over the corpus::

        .venv/bin/python fuzz/run.py http_request --seconds 600
        for t in $(.venv/bin/python -c 'from fuzz.targets import TARGETS; print(*TARGETS)'); do
            .venv/bin/python fuzz/run.py $t --seconds ${FUZZ_SECONDS:-600} || break; done

    Time (C{--seconds}) and memory (C{--rss-mb}, default 2048) are bounded.

The corpus: C{tests/corpus/TARGET/} holds small seed files (real client input:
curl, swaks, dig, ldapsearch dialogues).  To keep a crash: minimise it (atheris:
C{-minimize_crash=1}), copy the C{crash-*} file run.py wrote into
C{tests/corpus/TARGET/}, fix the parser; the trial test replays every corpus file
(C{test_TARGET_corpus}).
"""
