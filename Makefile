# Two commands on a fresh machine:  `make run`  and  `make test`. Both install what is missing first.
PY ?= python3
ALGO ?= bc
ENV ?= local/pendulum/expert-v0
STEPS ?= 20000
THREADS ?= 1

.PHONY: install run test bench datasets datasets-default clean-runs

# pip is only called when requirements.txt changed since the last successful install
install: .installed
.installed: requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch .installed

# The embedded default datasets (Pendulum-v1, built locally in a few minutes; skipped when present)
datasets-default: install
	$(PY) -m common.build_datasets pendulum --skip-existing

# The default suites: pendulum (continuous) and cartpole (discrete)
datasets: install
	$(PY) -m common.build_datasets pendulum --skip-existing
	$(PY) -m common.build_datasets cartpole --skip-existing

# Train the headline algorithm on the embedded default dataset, offline, and print its normalised score
run: datasets-default
	$(PY) algorithms/$(ALGO).py --env $(ENV) --max-steps $(STEPS) --threads $(THREADS)

test: install
	$(PY) -m pytest -q

# Gradient updates/s per algorithm against the FLOP floor; writes results/bench.md
bench: install
	$(PY) -m common.bench --threads $(THREADS)

clean-runs:
	rm -rf runs
