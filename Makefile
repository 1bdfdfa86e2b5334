# make run   -- create .venv if missing, install netsvc, run every service in etc/netsvc.yaml
# make test  -- install the test extras (and, as root, the Debian test peers), run the trial suite

VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
CONFIG  ?= etc/netsvc.yaml

.PHONY: run test install install-test peers bench fuzz clean

# The demo users file holds password hashes: readable by its owner only (git keeps no such mode).
run: install
	chmod go= etc/mail-users.txt
	$(BIN)/twistd -n --pidfile= netsvc --config $(CONFIG)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# A real (not editable) install: that is what puts twisted/plugins/netsvc_plugin.py
# into site-packages.  Rebuilding the plugin cache afterwards means a stale
# dropin.cache can never hide the plugin.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet .
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

install-test: install
	$(BIN)/python -m pip install --quiet ".[test]"

peers:
	@if [ "$$(id -u)" = 0 ]; then scripts/install-test-peers; \
	else echo "not root: skipping scripts/install-test-peers (interop tests skip what is missing)"; fi

test: install-test peers
	$(BIN)/python scripts/run-tests

bench: install
	for b in echo chat dns web forward ldap scale smtp; do $(BIN)/python bench/$$b.py || exit 1; done

# Every fuzz target coverage-guided (atheris, the 'fuzz' extra) for FUZZ_SECONDS each, FUZZ_JOBS at a
# time; each target's libFuzzer output goes to .fuzz/logs/TARGET.log and its crash files to .fuzz/
# (see fuzz/README.md: keep one as tests/corpus/TARGET/finding-* with a test).  A crash stops only its
# own target; the rule fails at the end if any target did.
FUZZ_SECONDS ?= 600
FUZZ_JOBS ?= 1
fuzz: install
	$(BIN)/python -m pip install --quiet ".[fuzz]"
	mkdir -p .fuzz/logs
	cd .fuzz && ../$(BIN)/python -c 'import sys; sys.path.insert(0, ".."); from fuzz.targets import TARGETS; print(*TARGETS, sep="\n")' \
		| xargs -P $(FUZZ_JOBS) -I{} sh -c '../$(BIN)/python ../fuzz/run.py {} --seconds $(FUZZ_SECONDS) >logs/{}.log 2>&1 \
			&& echo "{}: no crash in $(FUZZ_SECONDS) s" || { echo "{}: FAILED, see .fuzz/logs/{}.log"; exit 1; }'

clean:
	rm -rf build dist *.egg-info _trial_temp* var
