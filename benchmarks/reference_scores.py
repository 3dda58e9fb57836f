"""The random-policy returns behind ``trpo_lab.experiments.stats.REFERENCE_SCORES``.

A uniformly random policy on each env of the default compare, 200 episodes (reset seeds
0-199, action-space seed 0), next to Gymnasium's registered ``reward_threshold``::

    python benchmarks/reference_scores.py

prints, per env, the mean and standard deviation of the random returns and the threshold;
the stats module's table holds the means (to 0.1) and the thresholds (Pendulum-v1 registers
none: 0, its best possible return, stands in).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ENVS = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1")


def random_returns(env_id: str, episodes: int = 200) -> np.ndarray:
    """Returns of a uniformly random policy on ``episodes`` episodes (reset seeds 0..episodes-1)."""
    env = gym.make(env_id)
    env.action_space.seed(0)
    returns = []
    for episode in range(episodes):
        env.reset(seed=episode)
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return np.asarray(returns)


def main() -> None:
    for env_id in ENVS:
        returns = random_returns(env_id)
        threshold = gym.spec(env_id).reward_threshold
        print(f"{env_id}: random {returns.mean():.1f} +- {returns.std():.1f} (200 episodes); reward_threshold {threshold}")


if __name__ == "__main__":
    main()
