# The two commands of the README, and the pieces they are made of.
#   make run   - install (first time) and run the workflow on the embedded default config.yaml
#   make test  - install (first time) and run the test suite
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(HOME)/.local/bin/uv
endif
CORES ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: run test env lint dry-run paper-dry-run clean-results

$(UV):
	python3 -m pip install --user --quiet "uv==$(UV_VERSION)" || python3 -m pip install --quiet "uv==$(UV_VERSION)"

# A virtual environment exactly as uv.lock pins it (torch 2.13.0 with torchvision 0.28.0),
# compiled to bytecode once at install: where PYTHONDONTWRITEBYTECODE is set (as on these
# machines) every job would otherwise recompile torch and diffusers from source as it starts
# (README, "Install details"; benchmarks/startup.py measures it).
env: $(UV)
	$(UV) sync --locked --extra dev --compile-bytecode

run: env
	$(UV) run --no-sync snakemake --cores $(CORES)

# Two pytest-xdist workers: a test file runs whole on one worker, the tests that share the smoke
# run and the SLURM cluster run on one worker together, first (tests/conftest.py), so nothing is
# built twice; the in-process tests use one torch thread each, so two workers fill two cores.
TEST_WORKERS ?= 2
test: env
	$(UV) run --no-sync pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

lint: env
	$(UV) run --no-sync ruff check .
	$(UV) run --no-sync snakemake --lint

dry-run: env
	$(UV) run --no-sync snakemake -n --quiet rules

paper-dry-run: env
	$(UV) run --no-sync snakemake -n --quiet rules --configfile config/paper.yaml
