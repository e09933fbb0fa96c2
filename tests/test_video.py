"""Evaluation videos (--capture-video, python -m common.reporting.video): files that exist and decode, one frame
per state of the episode (T + 1 for T steps), the same episodes and numbers as without a video, no encoder
import without the flag, and one line before any training where the machine cannot draw."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, load_algorithm, run_algorithm_cli, run_config

from common import video as video_module
from common.datasets import OfflineDataset
from common.envs.fork import ARENA_HIGH, ARENA_LOW, RENDER_SIZE
from common.errors import UserError
from common.evaluation import EVAL_SEED_OFFSET, evaluate
from common.reporting import video as video_tool
from common.runs import Run
from common.video import VideoRecorder

bc = load_algorithm("bc")
PENDULUM_STEPS = 200  # Pendulum-v1's time limit: every evaluation episode has 200 steps


def decoded(path: Path) -> np.ndarray:
    """Every frame of an MP4, read back with imageio: (frames, H, W, 3) uint8."""
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack([frame for frame in reader.iter_data()])  # list(reader) trips on its infinite len()


@pytest.fixture(scope="module")
def pendulum_video_run(pendulum_expert_id, tmp_path_factory) -> dict:
    """A tiny BC run on pendulum with --capture-video: 20 steps, evaluated at step 10 and at the end, 2 episodes."""
    config = run_config(bc.Config, pendulum_expert_id, tmp_path_factory.mktemp("video"), max_steps=20,
                        eval_every=10, eval_episodes=2, capture_video=True)
    return bc.train(config)


def test_pendulum_run_writes_decodable_videos_with_one_frame_per_state(pendulum_video_run):
    videos = Path(pendulum_video_run["run_dir"]) / "videos"
    # the periodic evaluation records its first episode, the final one its first FINAL_EPISODES (here both of 2)
    assert sorted(p.name for p in videos.iterdir()) == [
        "step-10-episode-0.mp4", "step-20-episode-0.mp4", "step-20-episode-1.mp4"]
    for path in videos.iterdir():
        frames = decoded(path)
        assert frames.shape == (PENDULUM_STEPS + 1, 500, 500, 3), path.name  # s_0 .. s_200
        assert not np.array_equal(frames[0], frames[-1]), "the pendulum moved during the episode"
    episodes = [decoded(videos / f"step-20-episode-{i}.mp4") for i in range(2)]
    assert not np.array_equal(episodes[0][0], episodes[1][0]), "two episodes, two start states"


def fork_dataset() -> OfflineDataset:
    """PointFork-v0 as evaluation needs it (no episodes): its episodes end at different steps."""
    import common.envs  # noqa: F401  (registers PointFork-v0)

    spec = gym.spec("PointFork-v0")
    env = gym.make(spec)
    dataset = OfflineDataset(name="fork", minari_id="fork", episodes=[], observation_space=env.observation_space,
                             action_space=env.action_space, eval_env_spec=spec)
    env.close()
    return dataset


# row 0 drives into the obstacle, row 1 stands still until the time limit, row 2 creeps into the obstacle
FORK_ACTIONS = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.3]])


def fork_policy(obs: torch.Tensor) -> torch.Tensor:
    return FORK_ACTIONS[: len(obs)]


def point_position(frame: np.ndarray) -> np.ndarray:
    """Where the dark-blue point is drawn in a decoded PointFork-v0 frame, in arena coordinates (x, y)."""
    r, g, b = (frame[..., c].astype(int) for c in range(3))
    rows, cols = np.nonzero((b > r + 80) & (r < 80) & (g < 110))
    assert len(rows), "no point in the frame"
    scale = (RENDER_SIZE - 1) / (ARENA_HIGH - ARENA_LOW)
    return np.array([ARENA_LOW[0] + cols.mean() / scale[0], ARENA_HIGH[1] - rows.mean() / scale[1]])


def fork_path(row: int, seed: int) -> np.ndarray:
    """The positions s_0 .. s_T of evaluation episode `row`, stepped by hand in a plain env."""
    env = gym.make("PointFork-v0")
    obs, _ = env.reset(seed=EVAL_SEED_OFFSET + seed + row)
    path, done = [obs], False
    while not done:
        obs, _, terminated, truncated, _ = env.step(FORK_ACTIONS[row].numpy())
        path.append(obs)
        done = terminated or truncated
    return np.array(path)


def test_fork_video_frames_are_the_states_from_reset_to_the_final_one(tmp_path):
    dataset = fork_dataset()
    plain = evaluate(fork_policy, dataset, None, 3, seed=7)
    recorder = VideoRecorder(tmp_path, "step-0", episodes=3)
    recorded = evaluate(fork_policy, dataset, None, 3, seed=7, video=recorder)
    # recording changes nothing about the episodes, and they end at different steps
    assert np.array_equal(plain["lengths"], recorded["lengths"])
    assert np.array_equal(plain["returns"], recorded["returns"])
    assert len(set(recorded["lengths"].tolist())) == 3 and recorded["lengths"].max() == 50
    for i, length in enumerate(recorded["lengths"]):
        frames = decoded(tmp_path / f"step-0-episode-{i}.mp4")
        assert frames.shape == (length + 1, RENDER_SIZE, RENDER_SIZE, 3)
        path = fork_path(i, seed=7)
        assert len(path) == length + 1
        # frame t shows s_t: the start state first, the final state last (not the next episode's start)
        for t in (0, length // 2, length):
            assert np.abs(point_position(frames[t]) - path[t]).max() < 0.03, (i, t)


def test_groups_record_the_episodes_of_the_group_asked_for(tmp_path):
    from common.evaluation import evaluate_stateful

    def by_group(obs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:  # group 0 hits the obstacle, 1 waits
        return torch.cat([FORK_ACTIONS[:1].expand(2, 2), torch.zeros(2, 2)])

    for group in (0, 1):
        results = evaluate_stateful(by_group, fork_dataset(), None, 2, seed=0, groups=2,
                                    video=VideoRecorder(tmp_path / str(group), "step-0", episodes=1, group=group))
        assert [r["lengths"][0] for r in results] == [2, 50]
        assert decoded(tmp_path / str(group) / "step-0-episode-0.mp4").shape[0] == results[group]["lengths"][0] + 1


def test_only_the_recorded_envs_render(tmp_path, monkeypatch):
    made = []
    dataset = fork_dataset()
    original = OfflineDataset.make_env
    monkeypatch.setattr(OfflineDataset, "make_env", lambda self, render_mode=None: (
        made.append(render_mode), original(self, render_mode))[1])
    evaluate(fork_policy, dataset, None, 3, seed=0, video=VideoRecorder(tmp_path, "step-0", episodes=1))
    assert made == ["rgb_array", None, None]  # env 0 draws; envs 1 and 2 are made as without a video
    assert [p.name for p in tmp_path.iterdir()] == ["step-0-episode-0.mp4"]


def test_run_without_capture_video_writes_none_and_never_imports_the_encoder(tmp_path, pendulum_expert_id):
    import subprocess

    from conftest import ROOT

    # a fresh interpreter that lists every module it imports (-X importtime) trains and evaluates on pendulum
    proc = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "algorithms" / "bc.py"), "--env",
                           pendulum_expert_id, "--max-steps", "10", "--eval-episodes", "1", "--runs-dir",
                           str(tmp_path / "runs"), "--no-download"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "common.evaluation" in imported  # the log lists what was imported
    assert not {name for name in imported if name.split(".")[0] in ("imageio", "imageio_ffmpeg")}
    assert not list((tmp_path / "runs").glob("bc/*/*/videos"))


def test_capture_video_without_the_encoder_is_one_line_before_anything_is_written(tmp_path, pendulum_expert_id,
                                                                                  monkeypatch):
    for name in ("imageio", "imageio.v2", "imageio_ffmpeg"):
        monkeypatch.setitem(sys.modules, name, None)  # any `import imageio` now raises ImportError
    with pytest.raises(UserError, match="imageio-ffmpeg") as err:
        bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=10, eval_episodes=1,
                            capture_video=True))
    assert "\n" not in str(err.value) and not (tmp_path / "runs").exists()


def test_tool_renders_a_saved_run_as_its_final_evaluation(pendulum_video_run, tmp_path, capsys):
    run_dir = Path(pendulum_video_run["run_dir"])
    assert video_tool.main([str(run_dir), "--episodes", "2", "--out", str(tmp_path), "--png",
                            str(tmp_path / "still.png"), "--png-frames", "0", "100", "200"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{PENDULUM_STEPS} steps ->") == 2
    from PIL import Image

    assert Image.open(tmp_path / "still.png").size == (3 * (video_tool.PNG_TILE + 4),
                                                       video_tool.PNG_TILE + video_tool.PNG_LABEL + 2)
    assert decoded(tmp_path / "render-step-20-episode-0.mp4").shape[0] == PENDULUM_STEPS + 1
    for i in range(2):
        # the run's evaluation episodes, played by the loaded policy, give the run's own final videos (same frames,
        # same encoder: the same bytes)
        rendered = (tmp_path / f"render-step-20-episode-{i}.mp4").read_bytes()
        assert rendered == (run_dir / "videos" / f"step-20-episode-{i}.mp4").read_bytes()
    assert video_tool.main([str(tmp_path / "no-such-run")]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint at")


def test_track_logs_each_video_to_wandb_at_its_step(tmp_path):
    import wandb

    logged = []

    class FakeRun:
        wandb = type("W", (), {"log": lambda self, values, step: logged.append((step, values))})()

    path = tmp_path / "step-5-episode-0.mp4"
    path.write_bytes(b"")
    Run._log_videos(FakeRun(), 5, [path])
    (step, values), = logged
    assert step == 5 and list(values) == ["eval/video_episode_0"]
    assert isinstance(values["eval/video_episode_0"], wandb.Video)


def test_mujoco_render_error_is_one_line_naming_the_packages(monkeypatch):
    import mujoco
    from gymnasium.envs.mujoco import mujoco_rendering

    def no_opengl(self, *args, **kwargs):  # what MuJoCo raises where no OpenGL context could be made
        raise mujoco.FatalError("an OpenGL platform library has not been loaded into this process, this most "
                                "likely means that a valid OpenGL context has not been created before "
                                "mjr_makeContext was called")

    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setattr(mujoco_rendering.MujocoRenderer, "render", no_opengl)
    with pytest.raises(UserError) as err:
        video_module.check_recording(lambda render_mode: gym.make("InvertedPendulum-v5", render_mode=render_mode),
                                     "InvertedPendulum-v5")
    message = str(err.value)
    assert "\n" not in message and "FatalError" in message and "libegl1" in message and "libosmesa6" in message


def test_mujoco_without_gl_stops_before_training_with_one_line(inverted_pendulum_random_id, tmp_path, monkeypatch):
    # no headless backend works: PyOpenGL is pointed at a platform that does not exist, so the EGL and OSMesa
    # probes both fail, as on a machine without libegl1 and libosmesa6
    monkeypatch.setenv("PYOPENGL_PLATFORM", "no-such-platform")
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    proc = run_algorithm_cli("bc", "--env", inverted_pendulum_random_id, "--capture-video", "--max-steps", "10",
                             "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(proc, "apt-get install libegl1")
    assert "libosmesa6" in proc.stderr and not (tmp_path / "runs").exists()


def test_mujoco_run_records_headless_where_egl_or_osmesa_works(inverted_pendulum_random_id, tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "")  # restored after the test; empty: the run picks a backend
    if not any(video_module.gl_backend_works(b) for b in video_module.GL_BACKENDS):
        pytest.skip("neither EGL nor OSMesa works on this machine (apt-get install libegl1 or libosmesa6)")
    summary = bc.train(run_config(bc.Config, inverted_pendulum_random_id, tmp_path, max_steps=5, eval_episodes=1,
                                  capture_video=True))
    assert os.environ["MUJOCO_GL"] in video_module.GL_BACKENDS
    frames = decoded(Path(summary["run_dir"]) / "videos" / "step-5-episode-0.mp4")
    from common.checkpoint import load_policy
    from common.datasets import load_dataset

    policy = load_policy(summary["run_dir"])
    length = evaluate(lambda obs: torch.as_tensor(policy(obs.numpy())), load_dataset(inverted_pendulum_random_id),
                      None, 1, seed=0)["lengths"][0]
    assert frames.shape == (length + 1, 480, 480, 3) and frames.std() > 0


def test_history_dependent_run_records_videos_and_the_tool_replays_them(pendulum_mixed_id, tmp_path):
    dt = load_algorithm("dt")
    summary = dt.train(run_config(dt.Config, pendulum_mixed_id, tmp_path, max_steps=3, eval_episodes=1,
                                  capture_video=True, embed_dim=16, n_layers=1, n_heads=1, context_len=5))
    run_dir = Path(summary["run_dir"])
    assert len(summary["targets"]) == 2  # two groups of episodes (one per target); one video, of the first
    assert [p.name for p in (run_dir / "videos").iterdir()] == ["step-3-episode-0.mp4"]
    recorded = decoded(run_dir / "videos" / "step-3-episode-0.mp4")
    assert video_tool.main([str(run_dir), "--episodes", "1", "--out", str(tmp_path / "tool")]) == 0
    replayed = decoded(tmp_path / "tool" / "render-step-3-episode-0.mp4")
    # load_policy's history-keeping policy replays the evaluation loop (to float rounding): the same frames
    assert replayed.shape == recorded.shape == (PENDULUM_STEPS + 1, 500, 500, 3)
    assert np.abs(replayed[::20].astype(np.int16) - recorded[::20]).mean() < 1.0


def test_a_run_that_is_not_a_policy_refuses_capture_video_in_one_line(tmp_path, pendulum_expert_id):
    ope = load_algorithm("ope")
    with pytest.raises(UserError, match="ope.py run is not a policy") as err:
        ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, max_steps=10, capture_video=True))
    assert "common.reporting.video" in str(err.value) and not (tmp_path / "runs").exists()
