"""Property tests (hypothesis): the buffer and GAE, conjugate gradient, config validation.

Each property is checked against a reference written independently of the code under test:
GAE as explicit per-episode sums, CG against ``torch.linalg.solve`` and its A-norm
optimality, and config validation against an interpreter of the ranges the fields document.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trpo_lab.config import CONFIGS, AgentConfig
from trpo_lab.optim.cg import conjugate_gradient, solve_cg
from trpo_lab.rollout.buffer import RolloutBatch, RolloutBuffer, compute_gae, minibatches

settings.register_profile("trpo_lab", deadline=None, max_examples=60, derandomize=True)
settings.load_profile("trpo_lab")


# ---------------------------------------------------------------------------------- GAE / buffer
STEP_KINDS = ("continue", "terminate", "truncate", "nonfinite")


@st.composite
def rollouts(draw: st.DrawFn) -> dict[str, Any]:
    """A ``(T, N)`` rollout as the agent's loop stores it, with random episode boundaries.

    Per env: after a step that ended an episode comes its NEXT_STEP auto-reset slot (invalid,
    reward 0, value = V(final observation)).  A ``nonfinite`` step is what ``nan_policy='skip'``
    leaves: an invalid slot with reward 0, the slot before it marked truncated.
    """
    n_steps = draw(st.integers(1, 12))
    n_envs = draw(st.integers(1, 4))
    kinds = draw(st.lists(st.sampled_from(STEP_KINDS), min_size=n_steps * n_envs, max_size=n_steps * n_envs))
    floats = st.floats(-5, 5, allow_nan=False, width=32)
    rewards = np.array(draw(st.lists(floats, min_size=n_steps * n_envs, max_size=n_steps * n_envs)), np.float32)
    values = np.array(draw(st.lists(floats, min_size=n_steps * n_envs, max_size=n_steps * n_envs)), np.float32)
    last_values = np.array(draw(st.lists(floats, min_size=n_envs, max_size=n_envs)), np.float32)
    start_in_reset = draw(st.lists(st.booleans(), min_size=n_envs, max_size=n_envs))
    rewards, values = rewards.reshape(n_steps, n_envs), values.reshape(n_steps, n_envs)
    terminated = np.zeros((n_steps, n_envs), bool)
    truncated = np.zeros((n_steps, n_envs), bool)
    valid = np.ones((n_steps, n_envs), bool)
    for env in range(n_envs):
        previous_done = start_in_reset[env]
        for t in range(n_steps):
            kind = kinds[t * n_envs + env]
            if previous_done:  # auto-reset slot (possibly also non-finite: same outcome)
                valid[t, env], rewards[t, env], previous_done = False, 0.0, False
                continue
            if kind == "nonfinite":
                valid[t, env], rewards[t, env] = False, 0.0
                if t > 0:
                    truncated[t - 1, env] = True
            elif kind == "terminate":
                terminated[t, env] = previous_done = True
            elif kind == "truncate":
                truncated[t, env] = previous_done = True
    return {
        "rewards": rewards, "values": values, "last_values": last_values, "terminated": terminated,
        "truncated": truncated, "valid": valid,
        "gamma": draw(st.floats(0.5, 1.0)), "gae_lambda": draw(st.floats(0.0, 1.0)),
    }


def reference_advantages(r: dict[str, Any]) -> np.ndarray:
    """Per valid slot: A_t = Σ_k (γλ)^k δ_{t+k} over the rest of its episode segment in the rollout.

    δ_t = r_t + γ V(next) (1 − terminated_t) − V(s_t), where V(next) is the value stored in the
    following slot (for a step ending an episode that slot is the auto-reset or dropped slot,
    which holds V of the final / last finite observation) or ``last_values`` after the end.
    """
    rewards, values, gamma, lam = r["rewards"].astype(np.float64), r["values"].astype(np.float64), r["gamma"], r["gae_lambda"]
    n_steps, n_envs = rewards.shape
    advantages = np.full((n_steps, n_envs), np.nan)
    for env in range(n_envs):
        t = 0
        while t < n_steps:
            if not r["valid"][t, env]:
                t += 1
                continue
            end = t  # the segment of this episode inside the rollout: t..end
            while end < n_steps - 1 and not (r["terminated"][end, env] or r["truncated"][end, env]):
                end += 1
            deltas = []
            for k in range(t, end + 1):
                next_value = values[k + 1, env] if k + 1 < n_steps else float(r["last_values"][env])
                bootstrap = 0.0 if r["terminated"][k, env] else gamma * next_value
                deltas.append(rewards[k, env] + bootstrap - values[k, env])
            for k in range(t, end + 1):
                advantages[k, env] = sum((gamma * lam) ** (j - k) * deltas[j - t] for j in range(k, end + 1))
            t = end + 1
    return advantages


@given(rollouts())
def test_gae_of_the_buffer_matches_per_episode_sums(r: dict[str, Any]) -> None:
    n_steps, n_envs = r["rewards"].shape
    buffer = RolloutBuffer(n_steps, n_envs, (2,), (), torch.long)
    for t in range(n_steps):
        obs = np.full((n_envs, 2), float(t), np.float32)
        buffer.add(
            obs, torch.zeros(n_envs, dtype=torch.long), torch.zeros(n_envs), torch.from_numpy(r["values"][t]),
            r["rewards"][t], r["terminated"][t], r["truncated"][t], r["valid"][t],
        )
    buffer.finish(torch.from_numpy(r["last_values"]), r["gamma"], r["gae_lambda"])
    expected = reference_advantages(r)
    batch = buffer.batch()
    assert batch.size == int(r["valid"].sum())
    # batch() flattens in (step, env) order
    np.testing.assert_allclose(batch.advantages.numpy(), expected[r["valid"]], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(batch.returns.numpy(), (expected + r["values"])[r["valid"]], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(batch.observations[:, 0].numpy(), np.nonzero(r["valid"])[0].astype(np.float32))


@given(rollouts())
def test_compute_gae_never_lets_invalid_slots_leak(r: dict[str, Any]) -> None:
    """Whatever reward an invalid slot holds, no valid advantage changes (the chain is cut before it)."""
    tensors = {k: torch.from_numpy(np.asarray(r[k])) for k in ("rewards", "values", "terminated", "truncated")}
    next_values = torch.cat([tensors["values"][1:], torch.from_numpy(r["last_values"])[None]])
    base, _ = compute_gae(tensors["rewards"], tensors["values"], next_values, tensors["terminated"],
                          tensors["truncated"], r["gamma"], r["gae_lambda"])
    noisy_rewards = tensors["rewards"].clone()
    noisy_rewards[~torch.from_numpy(r["valid"])] = 1e6
    noisy, _ = compute_gae(noisy_rewards, tensors["values"], next_values, tensors["terminated"],
                           tensors["truncated"], r["gamma"], r["gae_lambda"])
    valid = torch.from_numpy(r["valid"])
    torch.testing.assert_close(noisy[valid], base[valid])


@given(st.integers(0, 200), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_minibatches_cover_every_sample_once_with_a_ragged_last_one(n: int, batch_size: int, seed: int) -> None:
    batch = RolloutBatch(*(torch.arange(n, dtype=torch.float32) for _ in range(6)))
    sizes, seen = [], []
    for minibatch in minibatches(batch, batch_size, torch.Generator().manual_seed(seed)):
        sizes.append(minibatch.size)
        seen.extend(minibatch.observations.tolist())
    assert sorted(seen) == list(range(n))
    assert all(size == batch_size for size in sizes[:-1])
    assert not sizes or 0 < sizes[-1] <= batch_size


# ---------------------------------------------------------------------------------- conjugate gradient
@st.composite
def spd_systems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    n = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    log_condition = draw(st.floats(0.0, 3.0))
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, log_condition, n, dtype=torch.float64)
    scale = 10 ** draw(st.floats(-3, 3))
    a = scale * (q * eigenvalues) @ q.T
    b = torch.randn(n, generator=generator, dtype=torch.float64)
    return (a + a.T) / 2, b


@given(spd_systems())
def test_cg_solves_random_spd_systems(system: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = system
    n = b.numel()
    x = conjugate_gradient(lambda v: a @ v, b, max_iter=3 * n, tol=0.0)
    exact = torch.linalg.solve(a, b)
    assert torch.linalg.norm(x - exact) <= 1e-6 * torch.linalg.norm(exact) + 1e-12


@given(spd_systems())
def test_cg_error_in_the_a_norm_never_increases(system: tuple[torch.Tensor, torch.Tensor]) -> None:
    """CG minimises ‖x − x*‖_A over growing Krylov spaces: more iterations never do worse."""
    a, b = system
    exact = torch.linalg.solve(a, b)

    def a_norm_error(iterations: int) -> float:
        x = solve_cg(lambda v: a @ v, b, max_iter=iterations, tol=0.0).x
        error = x - exact
        return float(error @ a @ error)

    errors = [a_norm_error(k) for k in range(1, b.numel() + 1)]
    initial = float(exact @ a @ exact)  # x0 = 0
    for before, after in zip([initial, *errors], errors):
        assert after <= before * (1 + 1e-6) + 1e-12 * initial


# ---------------------------------------------------------------------------------- config validation
def documented_check(allowed: str) -> Any:
    """The predicate a field's documented range (its ``allowed`` text) describes, or None if unknown."""
    text = allowed.strip()
    text = re.sub(r"\s*\(.*\)$", "", text)  # ">= 0 (0 disables)" -> ">= 0"
    optional = text.endswith(" or none")
    text = text.removesuffix(" or none")
    match = re.fullmatch(r"(>=|>)\s*(-?[\d.]+)", text)
    if match:
        op, bound = match.group(1), float(match.group(2))
        check = (lambda v: v >= bound) if op == ">=" else (lambda v: v > bound)
    elif match := re.fullmatch(r"in ([(\[])\s*(-?[\d.]+),\s*(-?[\d.]+)\s*([)\]])", text):
        lo_open, lo, hi, hi_open = match.group(1) == "(", float(match.group(2)), float(match.group(3)), match.group(4) == ")"

        def check(v: Any) -> bool:
            return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    elif choices := re.findall(r"'([^']*)'", text):
        if not (text.startswith("one of") or " or " in text) or "path" in text:
            return None
        check = (lambda v: v in choices)  # noqa: E731
    else:
        return None
    return (lambda v: v is None or check(v)) if optional else (lambda v: v is not None and check(v))


def documented_type(annotation: str) -> Any:
    base = annotation.removesuffix("| None").strip()
    return {
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "str": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
    }.get(base)


CHECKED_FIELDS = [
    (algo, f.name)
    for algo, cls in sorted(CONFIGS.items())
    for f in fields(cls)
    if documented_check(f.metadata.get("allowed", "")) is not None and documented_type(str(f.type)) is not None
]

candidate_values = st.one_of(
    st.integers(-5, 5),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2, 2),
    st.sampled_from([0, 1, 0.0, 1.0, 0.5, -0.0, 1e-12, 1 - 1e-12, 1 + 1e-12, math.nan, math.inf]),
    st.booleans(),
    st.none(),
    st.sampled_from(["raise", "skip", "cg", "adam", "lbfgs", "constant", "linear", "autograd", "func", "x", ""]),
    st.text(max_size=5),
)


def test_the_core_ranges_are_documented_in_a_checkable_form() -> None:
    names = {name for _, name in CHECKED_FIELDS}
    # learning_rate, clip_range and ent_coef take schedules (a number or a schedule string):
    # their ranges and forms are checked in tests/test_schedules.py.
    assert {"gamma", "gae_lambda", "n_steps", "batch_size", "target_kl", "nan_policy",
            "checkpoint_every", "cg_max_steps", "kl_clip"} <= names


@pytest.mark.parametrize(("algo", "name"), CHECKED_FIELDS)
@settings(max_examples=40)
@given(value=candidate_values)
def test_config_accepts_exactly_the_documented_range(algo: str, name: str, value: Any) -> None:
    cls: type[AgentConfig] = CONFIGS[algo]
    field = next(f for f in fields(cls) if f.name == name)
    in_range = documented_check(field.metadata["allowed"])
    type_ok = documented_type(str(field.type))
    optional = str(field.type).endswith("| None")
    should_accept = (value is None and optional) or (value is not None and type_ok(value) and in_range(value))
    try:
        config = cls.from_dict({name: value})
    except ValueError as exc:
        assert not should_accept, f"{algo}.{name}={value!r} is documented as {field.metadata['allowed']!r}: {exc}"
        assert f"Invalid {name}" in str(exc) and "expected" in str(exc), str(exc)
    else:
        assert should_accept, f"{algo}.{name}={value!r} accepted but documented as {field.metadata['allowed']!r}"
        assert getattr(config, name) == value or (value is not None and math.isclose(getattr(config, name), value))
