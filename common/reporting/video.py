"""Videos of a saved run, without training: its policy in its dataset's evaluation env, written as MP4.

    python -m common.reporting.video runs/iql/local-pendulum-medium-v0/0-20261124-101500
    python -m common.reporting.video RUN --episodes 3 --out videos/   # RUN: a run directory or its checkpoint.pt
    make video RUN=runs/...

The episodes are the run's evaluation episodes (env i reset with `EVAL_SEED_OFFSET + seed + i`, the run's
--seed unless `--seed` is given), played by the policy `common.checkpoint.load_policy` returns: a policy of the
state as it is; a sampling one (bc_expressive, diffusion_bc) samples, seeded with the run's --seed, as its
evaluation did (`--deterministic`: its deterministic mode instead, where it has one); a history-dependent one
(dt, diffusion_bc with action chunks) keeps each episode's history and sees the rewards, dt from the run's first
target return. So the videos show the run's final evaluation episodes (a sampling policy draws the same samples
when --episodes is the run's --eval-episodes, as load_policy's contract says).

Writes `<out>/render-step-<checkpoint step>-episode-<i>.mp4` (out: the run directory's videos/, the folder of a
checkpoint file given directly) and prints each episode's return and length. The frames are those of
`--capture-video` (common/video.py): T + 1 for an episode of T steps, the reset state to the final one. MuJoCo
envs draw through EGL or OSMesa without a display; where neither works, one line says what to install.
`--png FILE --png-frames 0 10 20`: also those frames of episode 0 side by side, as a still for a page (the
README's results/video-frame-pendulum.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.errors import EXIT_USER_ERROR, UserError, fail  # noqa: E402

DEFAULT_EPISODES = 3
PNG_TILE = 200  # pixels per frame in a --png still
PNG_LABEL = 24  # pixels above each frame for its label


def evaluation_env(config: dict):
    """The env a run was evaluated in, as an `OfflineDataset` (what evaluation needs): its dataset's (read
    locally, never downloaded), or for a run on a Gymnasium id (dagger.py --env Pendulum-v1, or `module:EnvId`)
    that env, with the run's --max-episode-steps where it set one."""
    import gymnasium as gym

    from common.datasets import OfflineDataset, load_dataset

    env = config.get("env")
    if not env:
        fail("the run's config names no --env: cannot tell which env to render")
    try:
        return load_dataset(env, download=False)
    except UserError as err:
        module, colon, env_id = env.rpartition(":")  # Gymnasium's `module:EnvId`: the module registers the id
        try:
            if colon:
                importlib.import_module(module)
            spec = gym.spec(env_id if colon else env)
        except Exception:
            raise err from None
    if config.get("max_episode_steps"):
        spec = dataclasses.replace(spec, max_episode_steps=int(config["max_episode_steps"]))
    probe = gym.make(spec)
    dataset = OfflineDataset(name=spec.id, minari_id=spec.id, episodes=[], observation_space=probe.observation_space,
                             action_space=probe.action_space, eval_env_spec=spec)
    probe.close()
    return dataset


def render_run(run: str, episodes: int = DEFAULT_EPISODES, out: str | None = None, seed: int | None = None,
               deterministic: bool = False, device: str = "cpu") -> tuple[list[Path], dict]:
    """Play `episodes` evaluation episodes of the run's policy and write their videos; returns (paths, the
    evaluation result of `common.evaluation.evaluate_stateful`: returns, lengths, means)."""
    import numpy as np
    import torch

    from common.checkpoint import find_checkpoint, load_checkpoint, load_policy
    from common.evaluation import evaluate_stateful
    from common.video import VideoRecorder, check_recording

    if episodes < 1:
        fail(f"--episodes must be at least 1, got {episodes}")
    ckpt = load_checkpoint(run)
    config = ckpt.get("config", {})
    dataset = evaluation_env(config)
    check_recording(dataset.make_env, getattr(dataset.eval_env_spec, "id", dataset.name))
    policy = load_policy(run, device, sample=not deterministic)
    stateful = hasattr(policy, "reset")  # history-dependent: policy(obs, reward), reset() per episode
    if stateful:
        policy.reset()

    def act(obs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        raw = obs.cpu().numpy()  # normalizer None below: load_policy normalises the raw observations itself
        return torch.as_tensor(np.asarray(policy(raw, rewards.cpu().numpy()) if stateful else policy(raw)))

    if out is None:
        given = Path(run)
        out = (given if given.is_dir() else find_checkpoint(run).parent) / "videos"
    video = VideoRecorder(out, f"render-step-{int(ckpt['step'])}", episodes)
    paths: list[Path] = []
    video.on_written = paths.extend
    seed = int(config.get("seed", 0)) if seed is None else seed
    result = evaluate_stateful(act, dataset, None, episodes, seed, "cpu", video=video)[0]  # act returns CPU tensors
    return paths, result


def frames_png(video: Path, frames: list[int], out: str | Path) -> Path:
    """Frames `frames` of `video` side by side in one PNG, each labelled with its index and cropped to the part
    of the picture that differs from the background (the corner pixel's colour) in any of them."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    from common.video import import_encoder

    wanted = sorted(set(frames))
    with import_encoder().get_reader(video, format="FFMPEG") as reader:
        picked = {t: frame for t, frame in enumerate(reader.iter_data()) if t in wanted}
    missing = [t for t in wanted if t not in picked]
    if missing:
        fail(f"--png-frames {' '.join(map(str, missing))}: {video.name} has {max(picked, default=-1) + 1} frames")
    stack = np.stack([picked[t] for t in frames]).astype(np.int16)
    moving = (np.abs(stack - stack[:1, :1, :1]).max(axis=(0, 3)) > 24)  # (H, W): differs from the background
    rows, cols = np.nonzero(moving) if moving.any() else (np.array([0, stack.shape[1] - 1]),) * 2
    half = max(np.ptp(rows), np.ptp(cols)) // 2 + 20  # a square around what moves, with a margin
    centre = ((rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2)
    top, left = (max(0, c - half) for c in centre)
    canvas = Image.new("RGB", (len(frames) * (PNG_TILE + 4), PNG_TILE + PNG_LABEL + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, t in enumerate(frames):
        tile = Image.fromarray(picked[t][top:top + 2 * half, left:left + 2 * half]).resize((PNG_TILE, PNG_TILE),
                                                                                          Image.LANCZOS)
        x = k * (PNG_TILE + 4)
        canvas.paste(tile, (x + 2, PNG_LABEL))
        draw.rectangle([x, PNG_LABEL - 2, x + PNG_TILE + 3, PNG_LABEL + PNG_TILE + 1], outline=(200, 200, 200))
        draw.text((x + 6, 3), f"frame {t}", fill=(40, 40, 40), font=ImageFont.load_default(size=16))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.reporting.video", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run directory (or its checkpoint.pt)")
    parser.add_argument("--episodes", type=int, default=DEFAULT_EPISODES,
                        help=f"evaluation episodes to play and record (default {DEFAULT_EPISODES})")
    parser.add_argument("--out", help="folder for the videos (default: the run directory's videos/)")
    parser.add_argument("--seed", type=int, help="evaluation seed (default: the run's --seed: its own episodes)")
    parser.add_argument("--deterministic", action="store_true",
                        help="a sampling policy's deterministic mode instead of the samples its evaluation scores")
    parser.add_argument("--device", default="cpu", help="torch device of the policy (default cpu)")
    parser.add_argument("--png", help="also write these frames of episode 0 side by side to this PNG file")
    parser.add_argument("--png-frames", type=int, nargs="+", default=[0, 10, 20, 30, 45, 200],
                        help="the frames --png shows (default 0 10 20 30 45 200: a pendulum's swing-up)")
    args = parser.parse_args(argv)
    try:
        paths, result = render_run(args.run, args.episodes, args.out, args.seed, args.deterministic, args.device)
        for i, path in enumerate(paths):
            print(f"episode {i}: return {result['returns'][i]:.1f}, {int(result['lengths'][i])} steps -> {path}")
        if args.png:
            print(f"frames {' '.join(map(str, args.png_frames))} of episode 0 -> "
                  f"{frames_png(paths[0], args.png_frames, args.png)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
