"""The scripted Pendulum-v1 expert used by the tests, the compounding-error experiment and the figures.

    from common.envs.pendulum import pendulum_expert      # obs (..., 3) -> torque (..., 1)

Energy pumping for the swing-up, PD control near the top: about -140 return over a 200-step episode against
about -1200 for uniformly random torques, so experiments with it know the expert's return exactly.
"""

from __future__ import annotations

import numpy as np

MAX_TORQUE = 2.0  # Pendulum-v1's action bound


def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """Scripted swing-up: pump energy towards the upright level, then PD-stabilise.

    `obs` (..., 3) = (cos theta, sin theta, theta dot); returns float32 torques (..., 1) in [-2, 2].
    """
    c, s, thdot = obs[..., 0], obs[..., 1], obs[..., 2]
    theta = np.arctan2(s, c)
    energy = 0.5 * thdot ** 2 + 15.0 * c  # thetaddot = 15 sin(theta) + 3 u  ->  E = thdot^2 / 2 + 15 cos(theta)
    pump = 0.5 * (15.0 - energy) * thdot
    pd = -(12.0 * theta + 2.5 * thdot)
    return np.clip(np.where(c > 0.85, pd, pump), -MAX_TORQUE, MAX_TORQUE)[..., None].astype(np.float32)


def scripted_pendulum_expert():
    """Factory for `dagger.py --expert common.envs.pendulum:scripted_pendulum_expert`."""
    return pendulum_expert
