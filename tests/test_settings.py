"""Per-dataset settings follow what the data is: a dataset whose name matches no row gets the row of the
family of the env it came from (issue: a user's Hopper data under its own name fell to the catch-all row)."""

from __future__ import annotations

import fnmatch

import numpy as np
import pytest
from conftest import ROOT, load_algorithm

from common.datasets import save_episodes, stored_env_id
from common.errors import UserError
from common.runs import apply_dataset_settings, env_family, settings_row

ALGORITHM_FILES = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))
RENAMED = "users/my-robot-logs/run3-v0"  # hopper data under a name that says nothing of hopper


@pytest.fixture(scope="module")
def renamed_hopper(minari_root) -> str:
    """Two short uniform-random Hopper-v5 episodes stored under an unrelated name."""
    import gymnasium as gym

    env = gym.make("Hopper-v5")
    episodes = []
    for seed in (0, 1):
        obs, _ = env.reset(seed=seed)
        o, a, r, te, tr = [obs], [], [], [], []
        for _ in range(20):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            o.append(obs), a.append(action), r.append(reward), te.append(terminated), tr.append(truncated)
            if terminated:
                break
        tr[-1] = not te[-1]
        episodes.append({"observations": np.asarray(o), "actions": np.asarray(a), "rewards": np.asarray(r),
                         "terminations": np.asarray(te), "truncations": np.asarray(tr)})
    if not (minari_root / RENAMED).exists():
        save_episodes(RENAMED, episodes, "Hopper-v5")
    return RENAMED


def test_env_families_of_gymnasium_ids():
    assert env_family("Hopper-v5") == ["hopper"] and env_family("HalfCheetah-v5") == ["halfcheetah"]
    assert env_family("AntMaze_UMaze-v4") == ["antmaze_umaze", "antmaze"]
    assert env_family("common.envs.fork:PointFork-v0") == ["pointfork"]


def hopper_row(table) -> int | None:
    """The row the documented rule gives hopper data of unknown name and quality: the first row other than
    the catch-all that a local hopper build of no particular quality matches, else Minari's, else D4RL's name."""
    for alias in ("local/hopper/data-v0", "mujoco/hopper/data-v0", "D4RL/hopper/data-v0", "hopper-data-v2"):
        for i, (pattern, _) in enumerate(table):
            if pattern != "*" and fnmatch.fnmatch(alias, pattern):
                return i
    return None


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_a_renamed_hopper_dataset_gets_the_hopper_row(name, renamed_hopper, capsys):
    """Every file whose table has a hopper row gives the renamed data that row (the one hopper data under its
    usual names gets), and says why; files without one keep their catch-all."""
    table = load_algorithm(name).DATASET_SETTINGS
    assert stored_env_id(renamed_hopper) == "Hopper-v5"
    row, why = settings_row(table, {renamed_hopper}, renamed_hopper)
    expected_row = hopper_row(table)
    if expected_row is not None:
        assert row == expected_row and "Hopper-v5" in why, (name, table[row][0], table[expected_row][0])
    else:
        assert table[row][0] == "*" and "catch-all" in why
    config = load_algorithm(name).Config(env=renamed_hopper)
    needed = {k for _, settings in table for k in settings if getattr(config, k) is None} - set(table[row][1])
    if needed:  # the row lacks a value the file has no default for (ReBRAC's betas): one line naming them
        with pytest.raises(UserError, match="no per-dataset default for"):
            apply_dataset_settings(config, table)
        return
    filled = apply_dataset_settings(config, table)
    expected = {k: v for k, v in table[row][1].items() if getattr(config, k) is None}
    assert {k: getattr(filled, k) for k in expected} == expected
    if expected:
        assert f"from the row '{table[row][0]}'" in capsys.readouterr().err


def test_iql_scales_a_renamed_hopper_datasets_rewards_by_the_return_range(renamed_hopper):
    """The case the issue found: IQL used raw rewards on a user's hopper data (the catch-all row)."""
    iql = load_algorithm("iql")
    config = apply_dataset_settings(iql.Config(env=renamed_hopper), iql.DATASET_SETTINGS, quiet=True)
    assert config.reward_transform == "return-range"


def test_a_name_match_still_wins_over_the_env():
    table = [("users/my-robot-logs/*", {"x": 1}), ("local/hopper*/*", {"x": 2}), ("*", {"x": 3})]
    row, why = settings_row(table, {RENAMED}, RENAMED)
    assert row == 0 and "name" in why
