# Two commands on a fresh machine:  `make run`  and  `make test`. Both install what is missing first.
PY ?= python3
ALGO ?= iql
ENV ?= local/pendulum/medium-replay-v0
STEPS ?= 10000
SEEDS ?= 0
QUALITIES ?= random medium medium-replay expert medium-expert
THREADS ?= 1

.PHONY: install run test bench datasets datasets-default scores clean-runs figures

# pip is only called when requirements.txt changed since the last successful install
install: .installed
.installed: requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@touch .installed

# The embedded default datasets (Pendulum-v1, built locally in a few minutes; skipped when present)
datasets-default: install
	$(PY) -m common.build pendulum --skip-existing

# The default suites: pendulum (continuous) and cartpole (discrete)
datasets: install
	$(PY) -m common.build pendulum --skip-existing
	$(PY) -m common.build cartpole --skip-existing

# Train the headline algorithm on the embedded default dataset, offline, and print its normalised score
run: datasets-default
	$(PY) algorithms/$(ALGO).py --env $(ENV) --max-steps $(STEPS) --threads $(THREADS)

test: install
	$(PY) -m pytest -q

# Gradient updates/s per algorithm against the FLOP floor; writes results/bench.md
bench: install
	$(PY) -m common.reporting.bench --threads $(THREADS)

# One algorithm on every quality of the pendulum suite, then results/scores.md from the runs
scores: datasets-default
	for q in $(QUALITIES); do for s in $(SEEDS); do \
	  $(PY) algorithms/$(ALGO).py --env local/pendulum/$$q-v0 --max-steps $(STEPS) --seed $$s \
	    --threads $(THREADS) --eval-every 0 --runs-dir runs/scores || exit 1; done; done
	$(PY) -m common.reporting.results --runs-dir runs/scores --output results/scores.md \
	  --command "make scores ALGO=$(ALGO) STEPS=$(STEPS) SEEDS='$(SEEDS)'"

# The lecture's claims as figures: results/figures/*.png and results/figures/README.md (a few minutes, 1 core)
figures: install
	$(PY) -m common.figures

clean-runs:
	rm -rf runs
