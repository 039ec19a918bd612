# make demo: create .venv, install segjobs, run the main job on this machine.
# make test: the same setup, then the whole test suite (what CI runs): two pytest workers, the SLURM tests
# (mostly waiting on the scheduler) on one of them, in order (xdist_group "slurm").
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := data/demo

.PHONY: install test demo demo-test clean

install: $(STAMP)

# torch resolves to a CUDA build that also runs on CPU; the first install takes a few minutes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# tests/slurm/ run against tools/minicluster: started here when none is up (root installs SLURM with apt-get),
# stopped after if started here. Without it they skip (CI=true makes them fail instead).
test: install
	@started=; \
	if ! tools/minicluster status >/dev/null 2>&1; then \
		if tools/minicluster up; then started=1; else echo "*** no SLURM cluster: tests/slurm will skip ***"; fi; \
	fi; \
	eval "$$(tools/minicluster env)"; \
	$(BIN)/python -m pytest -n 2 --dist loadgroup tests; status=$$?; \
	if [ -n "$$started" ]; then tools/minicluster down; fi; \
	exit $$status

# Synthetic ADE20K -> shards -> the three demo jobs via `segjobs submit --cluster auto` -> eval -> pictures.
demo: install
	$(BIN)/segjobs demo --root $(DEMO)

# The full demo in a temporary folder, asserting its figures (W-Net PSNR, DINO's Jaccard gain); about 12 minutes,
# so `make test` skips it.
demo-test: install
	SEGJOBS_DEMO_FIGURES=1 $(BIN)/python -m pytest -q -p no:xdist tests/test_demo.py -k full_demo

clean:
	rm -rf $(DEMO) runs/demo_segmenter runs/demo_wnet runs/demo_dino
