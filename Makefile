# Two commands on a fresh machine:  `make run`  and  `make test`. Both install what is missing first.
PY ?= python3
ALGO ?= iql
ENV ?= local/pendulum/medium-replay-v0
STEPS ?= 10000
SEEDS ?= 0
QUALITIES ?= random medium medium-replay expert medium-expert
THREADS ?= 1
# make sweep / make results: a grid of algorithms x datasets x seeds, and the run directories it reads
ALGOS ?= bc iql
ENVS ?= local/pendulum/medium-replay-v0 local/pendulum/medium-expert-v0
SWEEP_SEEDS ?= 0 1 2
NAME ?= sweep
RUNS ?= runs
FLAGS ?=

.PHONY: install run test bench datasets datasets-default scores clean-runs figures sweep results video export-policy \
	crosscheck finetune speed-vs-corl

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

# --compile of every algorithm file with inductor itself, compared with the eager update (about half a minute
# of compilation per file on a cold cache); `make test` compiles each file with aot_eager and two with inductor
.PHONY: test-compile bench-concurrent
test-compile: install
	COMPILE_FULL=1 $(PY) -m pytest -q tests/test_compile.py

# Gradient updates/s per algorithm against the FLOP floor; writes results/bench.md
bench: install
	$(PY) -m common.reporting.bench --threads $(THREADS)

# Aggregate seed-updates/s of 1, 2, 4, 8 compiled training processes of ALGO sharing one device (the GPU when
# present); writes results/bench-concurrent.md
CONCURRENT ?= 1 2 4 8
bench-concurrent: install
	$(PY) -m common.reporting.bench --concurrent $(CONCURRENT) --algos $(ALGO) --compile --threads $(THREADS)

# One algorithm on every quality of the pendulum suite (a sweep), its table in runs/scores/scores.md;
# results/ itself is rebuilt from all runs by `make results`
scores: datasets-default
	$(PY) -m common.reporting.sweep --algos $(ALGO) --envs $(foreach q,$(QUALITIES),local/pendulum/$(q)-v0) \
	  --seeds $(SEEDS) --threads $(THREADS) --runs-dir runs/scores --name scores-$(ALGO) \
	  -- --max-steps $(STEPS) --eval-every 0
	$(PY) -m common.reporting.results --runs-dir runs/scores --algos $(ALGO) --output runs/scores/scores.md \
	  --command "make scores ALGO=$(ALGO) STEPS=$(STEPS) SEEDS='$(SEEDS)'"

# Algorithms x datasets x seeds on Ray: one trial per core here, or a cluster with RAY_ADDRESS=HOST:PORT.
# Resumable: rerun the same command after an interruption. FLAGS go to every trial ("--max-steps 5000").
sweep: install
	$(PY) -m common.reporting.sweep --algos $(ALGOS) --envs $(ENVS) --seeds $(SWEEP_SEEDS) \
	  --threads $(THREADS) --runs-dir $(RUNS) --name $(NAME) $(if $(strip $(FLAGS)),-- $(FLAGS))

# results/scores.md and results/scores-hopper.md (tables, figures in results/scores*/) from the runs in $(RUNS)
results: install
	$(PY) -m common.reporting.results --runs-dir $(RUNS) --output results/scores.md \
	  --datasets 'local/pendulum/*' 'local/cartpole/*' --title "Pendulum and cartpole suites"
	$(PY) -m common.reporting.results --runs-dir $(RUNS) --output results/scores-hopper.md \
	  --datasets 'local/hopper-150k/*' --title "Reduced hopper suite (local/hopper-150k)" --skip-empty

# The lecture's claims as figures: results/figures/*.png and results/figures/README.md (a few minutes, 1 core)
figures: install
	$(PY) -m common.figures

# Videos of a saved run without training: make video RUN=runs/<algo>/<dataset>/<run> [EPISODES=3]
EPISODES ?= 3
video: install
	$(PY) -m common.reporting.video $(RUN) --episodes $(EPISODES)

# A run's deterministic policy as one file that runs without this library (torchscript: torch.jit.load; onnx:
# onnxruntime), normaliser and action bounds inside: make export-policy RUN=runs/<algo>/<dataset>/<run> [FORMAT=onnx]
FORMAT ?= onnx
export-policy: install
	$(PY) -m common.export $(RUN) --format $(FORMAT)

# One update of each file against its reference implementation on the same weights, batch and draws, a row per file
# in results/crosscheck.md. The references are not installed by this Makefile: CORL=<a checkout of
# corl-team/CORL>, JAX_PYTHON=<a Python with jax, flax, optax, chex> (rebrac), D3RLPY_PYTHON=<a Python with d3rlpy>
# (crr); CROSSCHECK='td3_bc iql' picks comparisons (default all)
CROSSCHECK ?= all
crosscheck: install
	$(PY) -m common.reporting.crosscheck $(if $(CORL),--reference $(CORL)) $(if $(JAX_PYTHON),--jax-python $(JAX_PYTHON)) \
	  $(if $(D3RLPY_PYTHON),--d3rlpy-python $(D3RLPY_PYTHON)) --algos $(CROSSCHECK)

# The fine-tuning table and curves (results/finetune.md, results/finetune/): every file with an online phase on
# pendulum medium-replay, 3 seeds; CQL and Cal-QL (about 10 updates/s on one core) at a smaller budget
FINETUNE_ENV ?= local/pendulum/medium-replay-v0
finetune: install
	$(PY) -m common.reporting.sweep --algos iql awac td3_bc rebrac spot --envs $(FINETUNE_ENV) --seeds $(SWEEP_SEEDS) \
	  --threads $(THREADS) --runs-dir runs/finetune --name finetune-5k -- --max-steps 5000 --online-steps 5000 --eval-every 1000
	$(PY) -m common.reporting.sweep --algos cql cal_ql --envs $(FINETUNE_ENV) --seeds $(SWEEP_SEEDS) \
	  --threads $(THREADS) --runs-dir runs/finetune --name finetune-2k -- --max-steps 2000 --online-steps 2000 --eval-every 500
	$(PY) -m common.reporting.results --runs-dir runs/finetune --output results/finetune.md \
	  --title "Offline to online fine-tuning" --command "make finetune"

# sac_n.py's updates/s against CORL's sac_n.py and edac.py, side by side (results/speed-vs-corl.md); CORL=<checkout>
speed-vs-corl: install
	$(PY) -m common.reporting.crosscheck.speed --reference $(CORL)

# every run and sweep, but not runs/datasets (the builder's build folders: DAgger's default expert lives there)
clean-runs:
	@if [ -d runs ]; then find runs -mindepth 1 -maxdepth 1 ! -name datasets -exec rm -rf {} +; fi
