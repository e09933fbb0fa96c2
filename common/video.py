"""Evaluation videos: the frames of evaluation episodes, written as MP4 (`--capture-video`, the video tool).

What a video is. One evaluation episode of T steps gives T + 1 frames: frame t is `env.render()` (rgb_array,
(H, W, 3) uint8) of the state s_t, from the reset state s_0 to the state s_T the last action led to (a terminal
state, or the one at the time limit), so the last frame shows how the episode ended; action a_t is taken in
frame t's state. It plays at the env's `render_fps` (Pendulum-v1 30, PointFork-v0 10, MuJoCo locomotion 1/dt,
e.g. Hopper-v5 125: real time).

    recorder = VideoRecorder(run_dir / "videos", "step-1000", episodes=3)
    evaluate(policy, dataset, normalizer, 10, seed, video=recorder)   # -> videos/step-1000-episode-{0,1,2}.mp4

Only the recorded envs are made with render_mode="rgb_array" (`make_eval_envs(..., render=)`), and only they
draw, once per step, until their first episode ends (`FrameCapture`). Frames go to the encoder as they come
(an episode of 1000 MuJoCo frames is never held in memory).

The encoder is imageio's FFMPEG writer (H.264 in MP4; imageio-ffmpeg's wheel carries the ffmpeg binary),
imported only when a frame is written: a run without videos never needs it.

Drawing without a display: Pendulum (pygame) and PointFork-v0 (numpy) draw on the CPU. MuJoCo envs need an
OpenGL context without a window: EGL (Debian/Ubuntu package libegl1: a GPU's driver, or Mesa's CPU renderer) or
OSMesa (libosmesa6). `check_recording` picks the first that works here (unless MUJOCO_GL is set) and draws one
frame before anything is trained, so a machine that cannot render stops at once with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from common.errors import UserError, fail

FINAL_EPISODES = 3  # the final evaluation's first 3 episodes: how the trained policy behaves, and how it varies
PERIODIC_EPISODES = 1  # one episode per periodic evaluation (--eval-every): progress without hundreds of files
DEFAULT_FPS = 30  # for an env whose metadata names no render_fps
# MuJoCo's headless OpenGL backends (MUJOCO_GL), tried in this order, and the Debian/Ubuntu package of each
GL_BACKENDS = {"egl": "libegl1", "osmesa": "libosmesa6"}
GL_PROBE_TIMEOUT_S = 60


def headless() -> None:
    """Draw without a display or a sound device: SDL (pygame, Gymnasium's classic-control renderer) gets its
    dummy drivers unless the user chose others, so it neither needs a window nor prints audio errors."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")


def import_encoder():
    """imageio's v2 API with its FFMPEG plugin ready (the ffmpeg binary found), or one line saying what to
    install. Called only when a video is written (or checked for): the core never imports it otherwise."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except ImportError as err:
        fail(f"--capture-video needs imageio and imageio-ffmpeg (whose wheel carries ffmpeg), which are not "
             f"installed ({err}): pip install -r requirements.txt")
    except RuntimeError as err:  # imageio-ffmpeg without its binary (a source install on an odd platform)
        fail(f"--capture-video: imageio-ffmpeg finds no ffmpeg binary ({err}); reinstall it from a wheel "
             f"(pip install --force-reinstall imageio-ffmpeg) or set IMAGEIO_FFMPEG_EXE")
    return imageio


class FrameCapture(gym.Wrapper):
    """Hands `render()` of the state after `reset` and after every `step` to `sink(frame)` while a sink is set.

    The sink is dropped when the episode ends, right after its last frame, so that one sink sees exactly one
    episode's T + 1 frames (a vector env's automatic reset draws nothing). Without a sink nothing is drawn.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.sink: Callable[[np.ndarray], None] | None = None

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self._capture()
        return out

    def step(self, action):
        out = self.env.step(action)
        self._capture()
        if out[2] or out[3]:  # terminated or truncated: this episode's frames are complete
            self.sink = None
        return out

    def _capture(self) -> None:
        if self.sink is not None:
            self.sink(self.env.render())


class _Mp4:
    """One episode's MP4, opened at its first frame (whose size fixes the video's) and written to a temporary
    name until `close`, so that a run killed mid-episode leaves no truncated `.mp4` behind."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.tmp = path.with_name(path.stem + ".tmp.mp4")
        self.writer = None
        self.frames = 0

    def __call__(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            fail(f"--capture-video: the env drew a frame of shape {frame.shape}, not (height, width, 3)")
        if self.writer is None:
            imageio = import_encoder()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # H.264 wants even sizes: macro_block_size 2 keeps e.g. Pendulum's 500 x 500 as it is
            self.writer = imageio.get_writer(self.tmp, format="FFMPEG", fps=self.fps, codec="libx264",
                                             macro_block_size=2, ffmpeg_log_level="error")
        self.writer.append_data(frame.astype(np.uint8, copy=False))
        self.frames += 1

    def close(self, keep: bool) -> Path | None:
        if self.writer is None:
            return None
        self.writer.close()
        if not keep:
            self.tmp.unlink(missing_ok=True)
            return None
        os.replace(self.tmp, self.path)
        return self.path


class VideoRecorder:
    """Records the first `episodes` episodes of one evaluation to `<folder>/<name>-episode-<i>.mp4`.

    Pass it to `common.evaluation.evaluate` / `evaluate_stateful` (`video=`): they step fresh envs whose
    recorded ones render, attach the recorder (`attach`) before the reset and `close` it at the end. `group`:
    which group of `evaluate_stateful(groups=...)` is recorded (its episodes 0..episodes-1). `on_written(paths)`
    is called with the finished files (a run logs them to W&B there).
    """

    def __init__(self, folder: str | Path, name: str, episodes: int, group: int = 0,
                 on_written: Callable[[list[Path]], Any] | None = None):
        if episodes < 1:
            fail(f"a video records at least 1 episode, got {episodes}")
        self.folder, self.name, self.episodes, self.group = Path(folder), name, int(episodes), int(group)
        self.on_written = on_written
        self.files: list[_Mp4] = []

    def env_indices(self, episodes: int, groups: int = 1) -> list[int]:
        """The vector-env rows this recorder records, for `groups` x `episodes` envs: group `group`'s first ones."""
        if not 0 <= self.group < groups:
            raise ValueError(f"video group {self.group} outside the evaluation's {groups} group(s)")
        return [self.group * episodes + i for i in range(min(self.episodes, episodes))]

    def attach(self, envs: gym.vector.SyncVectorEnv, indices: Sequence[int]) -> None:
        """Give the `FrameCapture` of each env in `indices` (made by `make_eval_envs(..., render=indices)`) a file."""
        for i, row in enumerate(indices):
            env = envs.envs[row]
            if not isinstance(env, FrameCapture):
                raise ValueError(f"env {row} was not made to render (make_eval_envs(..., render=[...]))")
            file = _Mp4(self.folder / f"{self.name}-episode-{i}.mp4", env.metadata.get("render_fps") or DEFAULT_FPS)
            env.sink = file
            self.files.append(file)

    def close(self, ok: bool = True) -> list[Path]:
        """Finish every file (`ok` False: an evaluation that failed, whose files are removed) and return the
        written paths, episode order."""
        paths = [p for p in (f.close(ok) for f in self.files) if p is not None]
        self.files = []
        if paths and self.on_written is not None:
            self.on_written(paths)
        return paths


# --------------------------------------------------------------------------------------------------
# Can this machine draw the env? Checked before anything is trained.
# --------------------------------------------------------------------------------------------------

_GL_PROBE = """
import mujoco
from mujoco.{backend} import GLContext
context = GLContext(64, 64)
context.make_current()
model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='0.1'/></worldbody></mujoco>")
mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
context.free()
"""


def gl_backend_works(backend: str) -> bool:
    """Whether MuJoCo gets an OpenGL context from `backend` ("egl", "osmesa") here, tried in a child process (a
    backend that fails can leave OpenGL half-loaded, or crash, in the process that tried it)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _GL_PROBE.format(backend=backend)], capture_output=True,
                              env=dict(os.environ, MUJOCO_GL=backend), timeout=GL_PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def no_gl_message(env_id: str) -> str:
    tried = " and ".join(f"MUJOCO_GL={b}" for b in GL_BACKENDS)
    packages = " or ".join(f"{'EGL' if b == 'egl' else 'OSMesa'} (apt-get install {p})" for b, p in GL_BACKENDS.items())
    return (f"--capture-video: the MuJoCo env {env_id} cannot draw here: no OpenGL without a display ({tried} "
            f"both fail). Install {packages}; a GPU's driver brings EGL with it. Or set MUJOCO_GL to a backend that "
            f"works here (glfw, with a display)")


def choose_mujoco_gl(env_id: str) -> str:
    """Set MUJOCO_GL to the first headless backend that works here (EGL, else OSMesa) and return it; the user's
    own MUJOCO_GL is kept. One line naming the system packages to install when neither works."""
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    for backend in GL_BACKENDS:
        if gl_backend_works(backend):
            os.environ["MUJOCO_GL"] = backend  # gymnasium's MuJoCo renderer reads it at its first frame
            return backend
    fail(no_gl_message(env_id))


def uses_mujoco(env: gym.Env) -> bool:
    """Whether `env` draws through MuJoCo (gymnasium's MuJoCo envs and Gymnasium-Robotics' have a renderer)."""
    return hasattr(env.unwrapped, "mujoco_renderer")


def check_recording(make_env: Callable[..., gym.Env], env_id: str) -> None:
    """Before anything is trained with --capture-video: the encoder is installed and the evaluation env
    (`make_env(render_mode="rgb_array")`) draws an rgb_array frame here (MuJoCo: after `choose_mujoco_gl`).
    `UserError` with one line otherwise, so that a run never fails at its first video after hours of training.
    """
    import_encoder()
    headless()
    env = make_env(render_mode="rgb_array")
    mujoco = uses_mujoco(env)
    try:
        if mujoco:
            choose_mujoco_gl(env_id)
        env.reset(seed=0)
        frame = env.render()
    except UserError:
        raise
    except Exception as err:
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if mujoco:
            backend = os.environ.get("MUJOCO_GL")
            packages = " or ".join(f"{b} ({p})" for b, p in GL_BACKENDS.items())
            fail(f"--capture-video: the MuJoCo env {env_id} cannot draw here with MUJOCO_GL={backend} ({detail}); "
                 f"install {packages} with apt-get, or unset MUJOCO_GL to let the run pick one that works")
        fail(f"--capture-video: the env {env_id} cannot draw frames here ({detail})")
    finally:
        try:
            env.close()
        except Exception:  # a renderer that never started cannot be closed cleanly (gymnasium's MuJoCo one)
            pass
    shape = getattr(frame, "shape", None)
    if shape is None or len(shape) != 3 or shape[-1] != 3:
        fail(f"--capture-video: the env {env_id} draws no rgb_array frames (render() returned "
             f"{type(frame).__name__}{'' if shape is None else f' of shape {shape}'})")
