"""Every algorithm file follows the library's shape: shared flags, docstring, Agent contract, bench row."""

from __future__ import annotations

import ast
import dataclasses
import io

import pytest
import torch
from conftest import ROOT, load_algorithm

from common.reporting import bench

# The shared Config fields, in this order, in every algorithm file (see shared/style.md).
SHARED_FIELDS = ["env", "seed", "device", "threads", "max_steps", "batch_size", "eval_every", "eval_episodes",
                 "log_every", "checkpoint_every", "checkpoint_dir", "resume", "track", "wandb_project",
                 "runs_dir", "download", "compile", "online_steps", "capture_video"]
ALGORITHM_FILES = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_algorithm_file_has_the_shared_shape(name):
    module = load_algorithm(name)
    doc = module.__doc__ or ""
    assert "Lecture" in doc or "lecture" in doc, f"{name}: docstring must name the lecture section"
    assert f"python algorithms/{name}.py" in doc, f"{name}: docstring must show a usage line"
    fields = [f.name for f in dataclasses.fields(module.Config)]
    assert fields[: len(SHARED_FIELDS)] == SHARED_FIELDS, f"{name}: shared Config fields differ"
    shared_defaults = {f.name: f.default for f in dataclasses.fields(load_algorithm("bc").Config)}
    for f in dataclasses.fields(module.Config):
        if f.name in SHARED_FIELDS and f.name not in ("env", "max_steps", "batch_size", "eval_every", "log_every",
                                                      "checkpoint_every"):  # batch_size: checked just below
            assert f.default == shared_defaults[f.name], f"{name}: default of {f.name} differs from bc.py"
    defaults = module.Config()
    # 256 as the papers, unless the file declares its paper's own (Decision Transformer: PAPER_BATCH_SIZE = 64)
    paper_batch_size = getattr(module, "PAPER_BATCH_SIZE", 256)
    assert defaults.batch_size == paper_batch_size, f"{name}: the paper's batch size is {paper_batch_size}"
    for attr in ("Agent", "train", "DATASET_SETTINGS"):
        assert hasattr(module, attr), f"{name}: missing {attr}"


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_agent_contract_and_state_round_trip(name):
    agent, config, spec = bench.make_agent(name, torch.device("cpu"), compile_update=False)
    source = bench.batch_source(name, spec, config, torch.device("cpu"))  # the file's own, e.g. windows
    logs = agent.update(source.sample(32))
    assert logs and all(k.startswith("train/") for k in logs)
    assert all(isinstance(v, torch.Tensor) for v in logs.values()), "logs stay tensors: no per-step sync"
    obs = bench.synthetic_batch_source(spec, torch.device("cpu")).sample(4)["obs"]
    action = agent.act(obs)
    assert action.shape[0] == 4
    clone, _, _ = bench.make_agent(name, torch.device("cpu"), compile_update=False)
    clone.load_state_dict(agent.state_dict())
    assert torch.equal(clone.act(obs), action)


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_bench_tiny_agent_runs_the_same_update_with_little_arithmetic(name):
    agent, config, spec = bench.make_agent(name, torch.device("cpu"), compile_update=False, tiny=True)
    assert config.batch_size == bench.TINY_BATCH
    widths = [getattr(config, f.name) for f in dataclasses.fields(config) if f.name.endswith("hidden_dims")]
    widths += [(getattr(config, f.name),) for f in dataclasses.fields(config) if f.name.endswith("embed_dim")]
    assert widths and all(set(w) == {bench.TINY_WIDTH} for w in widths)
    full, _, _ = bench.make_agent(name, torch.device("cpu"), compile_update=False)
    source = bench.batch_source(name, spec, config, torch.device("cpu"))
    assert set(agent.update(source.sample(config.batch_size))) == set(full.update(source.sample(32)))
    with bench.FlopCount() as counter:  # the bench counts every file's FLOPs (EDAC's update is second order)
        agent.update(source.sample(config.batch_size))
    assert counter.total > 0


def test_bench_harness_reports_rates_and_floor(tmp_path):
    out = tmp_path / "bench.md"
    assert bench.main(["--algos", "bc", "--seconds", "0.05", "--warmup", "5", "--device", "cpu",
                       "--output", str(out)]) == 0
    text = out.read_text()
    assert "| bc | cpu | no |" in text and "Commit:" in text and "torch threads 1" in text
    assert "% of floor+overhead" in text and "sampling % of update" in text
    assert bench.main(["--algos", "no_such_algo", "--output", str(out)]) == 2


def test_bench_table_cells_keep_small_rates_and_mark_what_does_not_apply():
    assert bench._cell(0.153) == "0.153"  # a rollout round per second: 0.1 would hide a 50% difference
    assert bench._cell(float("nan")) == "-"  # rollout rows have no overhead or sampling column
    assert bench._cell(745.72) == "745.7" and bench._cell(1418.4, 0) == "1418" and bench._cell(64) == "64"


# --- the shape CONTRIBUTING.md promises, read from each file's source ------------------------------------

CORE_MODULES = sorted(p.stem for p in (ROOT / "common").glob("*.py") if p.stem != "__init__")
SHARED_BLOCKS = {"VectorizedLinear", "CriticEnsemble", "EnsembleLinear", "DynamicsEnsemble"}
PATH_SETUP = ('sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / '
              '"__init__.py").is_file()),')
COMPILE_NAMES = {"compile", "_dynamo"}  # torch.compile, torch._dynamo: common/optim.py's, never a file's
ADAM_FLAGS = {"fused", "foreach", "capturable"}
RENAMED = {"discount": "gamma", "polyak": "tau"}  # one name per concept: the lecture's


def source_tree(name: str) -> tuple[str, ast.Module]:
    source = (ROOT / "algorithms" / f"{name}.py").read_text()
    return source, ast.parse(source)


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module an AST imports, at any depth (imports inside functions count too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_file_reads_config_settings_agent_train_in_that_order(name):
    _, tree = source_tree(name)
    lines = {node.name: node.lineno for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    settings = next(node.lineno for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    and "DATASET_SETTINGS" in ast.unparse(node.targets[0] if isinstance(node, ast.Assign)
                                                          else node.target))
    assert lines["Config"] < settings < lines["Agent"] < lines["train"], f"{name}: Config, settings, Agent, train"
    assert max(lines.values()) == lines["train"], f"{name}: train() is the last definition"
    main = tree.body[-1]
    assert isinstance(main, ast.If) and "__main__" in ast.unparse(main.test)
    assert ast.unparse(main.body[0]) == "run_cli(train, Config)", f"{name}: __main__ calls run_cli(train, Config)"


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_file_imports_only_the_core_and_finds_its_own_common(name):
    source, tree = source_tree(name)
    assert PATH_SETUP in source, f"{name}: the path set-up that puts its own common/ first (see CONTRIBUTING.md)"
    tools = sorted(m for m in imported_modules(tree) if m.startswith("common.")
                   and m.split(".")[1] not in CORE_MODULES)
    assert not tools, f"{name}: imports tools {tools}; an algorithm file imports the core of common/ only"


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_file_calls_the_shared_plumbing_and_blocks_instead_of_copying_them(name):
    _, tree = source_tree(name)
    copies = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)} & SHARED_BLOCKS
    assert not copies, f"{name}: defines {copies}; import them from common.networks / common.dynamics"
    machinery = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COMPILE_NAMES and ast.unparse(node.value) == "torch":
            machinery.add(f"torch.{node.attr}")
        if isinstance(node, ast.keyword) and node.arg in ADAM_FLAGS:
            machinery.add(f"{node.arg}=")
        if isinstance(node, ast.Constant) and node.value in ADAM_FLAGS:
            machinery.add(repr(node.value))
    assert not machinery, f"{name}: compile/optimiser plumbing {sorted(machinery)} belongs in common/optim.py"


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_one_flag_name_per_concept(name):
    fields = {f.name for f in dataclasses.fields(load_algorithm(name).Config)}
    assert not fields & RENAMED.keys(), f"{name}: {sorted(fields & RENAMED.keys())} are spelled gamma / tau"


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_agent_state_loads_without_running_code(name):
    """A checkpoint is loaded with weights_only=True and no allow-list: the agent's state is tensors and plain
    values only."""
    agent, config, spec = bench.make_agent(name, torch.device("cpu"), compile_update=False, tiny=True)
    agent.update(bench.batch_source(name, spec, config, torch.device("cpu")).sample(config.batch_size))
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    clone, _, _ = bench.make_agent(name, torch.device("cpu"), compile_update=False, tiny=True)
    clone.load_state_dict(state)


def module_graph() -> dict[str, set[str]]:
    """Every module of common/ and algorithms/ -> the modules of the tree it imports (at any depth)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in [*(ROOT / "common").rglob("*.py"), *(ROOT / "algorithms").glob("*.py")]}
    graph = {}
    for module, path in files.items():
        deps = set()
        for name in imported_modules(ast.parse(path.read_text())):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def test_imports_run_one_way_and_form_no_circle():
    """The core (common/*.py) imports no tool (common/<subpackage>/) and no algorithm file; nothing in the tree
    imports in a circle (lazy imports inside functions count)."""
    graph = module_graph()
    core = {f"common.{m}" for m in CORE_MODULES} | {"common"}
    for module in sorted(core & graph.keys()):
        outside = sorted(d for d in graph[module] if d not in core)
        assert not outside, f"{module} (core) imports {outside}"
    # a circle is a module reachable from itself
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"import circle through {start}"
            if module not in seen:
                seen.add(module)
                todo.extend(graph.get(module, ()))


def test_the_layout_checks_can_fail():
    """The import and plumbing checks see what they are meant to (a circle, a tool import, a copied block)."""
    tree = ast.parse("import common.build.recipe\ndef f():\n    from common.errors import fail\n"
                     "class CriticEnsemble: pass\nx = torch.compile(f)\n")
    assert {"common.build.recipe", "common.errors", "common.errors.fail"} <= imported_modules(tree)
    assert any(isinstance(n, ast.Attribute) and n.attr == "compile" for n in ast.walk(tree))
