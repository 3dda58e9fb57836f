"""Memory estimates made before anything is allocated, checked against what the machine has.

Everything whose size the user picks is estimated here, from shapes alone, before it is
built: the networks (parameters, gradients, optimizer state, the activations of one
update's batch), K-FAC's Kronecker factors and their eigendecompositions, Shampoo's
preconditioners, the dense (exact) Fisher and the rollout buffer. :func:`check_agent_memory`
adds them up for an agent and, when the total exceeds the memory available on its device
(or the user's ``max_memory``), raises a ``ValueError`` that names the setting responsible,
the estimate and a value of that setting that would fit, instead of letting the allocator
fail with a traceback.

The estimates are upper bounds of the order of magnitude, not byte-exact accounts: each
counts the tensors that live at the same time during an update (e.g. the batch copy of the
rollout next to its storage, the eigenvectors next to the factors), in the dtype they are
stored in.

Available memory: ``torch.cuda.mem_get_info`` on a GPU; on the CPU ``psutil`` when it is
installed, else ``MemAvailable`` of ``/proc/meminfo``, else ``os.sysconf`` (free physical pages).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from trpo_lab.validation import invalid, is_number

if TYPE_CHECKING:
    from trpo_lab.config import AgentConfig

__all__ = [
    "MemoryEstimate",
    "available_memory",
    "parse_memory",
    "format_bytes",
    "observation_bytes",
    "buffer_bytes",
    "network_bytes",
    "kfac_bytes",
    "shampoo_bytes",
    "exact_fisher_bytes",
    "estimate_agent_memory",
    "check_memory",
    "check_agent_memory",
    "rollout_budget_note",
]

ACTIVATION_COPIES = 4
"""Per-sample activations alive at once in an update: the forward outputs, their gradients and,
for Fisher-vector products by double backprop, the second backward's (a bound for all agents)."""

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def format_bytes(size: float) -> str:
    """``size`` bytes in binary units (``"1.5 GiB"``)."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"


def parse_memory(value: object, name: str = "max_memory") -> int:
    """A memory size in bytes: an integer number of bytes or a string such as ``"8GB"``, ``"512MiB"``.

    Raises:
        ValueError: naming ``name``, the value and the accepted forms.
    """
    expected = "a positive number of bytes or a size such as '8GB', '512MiB' or '2G'"
    if is_number(value):
        if float(value) <= 0:  # type: ignore[arg-type]
            raise invalid(name, value, expected)
        return int(float(value))  # type: ignore[arg-type]
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise invalid(name, value, expected)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """``(bytes available, where that figure comes from)``; ``None`` bytes when it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    try:
        import psutil  # optional

        return int(psutil.virtual_memory().available), "available memory (psutil)"
    except ImportError:
        pass
    meminfo = _meminfo_available()
    if meminfo is not None:
        return meminfo, "available memory (/proc/meminfo)"
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "free memory (sysconf)"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


# ---------------------------------------------------------------------------- estimates
def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def observation_bytes(space: gym.Space[Any]) -> int:
    """Bytes of one stored observation, as the rollout buffer stores it: uint8 images
    (:func:`~trpo_lab.nn.extractors.is_image_space`) as bytes, other ``Box`` as float32,
    ``Discrete`` as an int64 index, ``Dict`` / ``Tuple`` as the sum of their parts."""
    from trpo_lab.nn.extractors import is_image_space  # the buffer's rule (nn imports this module's users)

    if isinstance(space, gym.spaces.Dict):
        return sum(observation_bytes(sub) for sub in space.spaces.values())
    if isinstance(space, gym.spaces.Tuple):
        return sum(observation_bytes(sub) for sub in space.spaces)
    if isinstance(space, gym.spaces.Discrete):
        return 8
    shape = tuple(space.shape or ())
    itemsize = 1 if is_image_space(space, normalize_images=False) else 4
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def buffer_bytes(
    observation_space: gym.Space[Any], action_space: gym.Space[Any], n_steps: int, n_envs: int
) -> int:
    """The rollout buffer: storage for ``n_steps x n_envs`` slots plus the flat batch copied from it.

    Per slot: the observation, the action, six float32 (log-prob, value, reward, advantage,
    return, and the batch's copy of them) and three flags.
    """
    action = 4 * max(int(np.prod(action_space.shape or (), dtype=np.int64)), 1)
    if not isinstance(action_space, gym.spaces.Box):
        action *= 2  # int64 indices
    per_slot = 2 * (observation_bytes(observation_space) + action) + 6 * 4 + 3
    return int(n_steps) * int(n_envs) * per_slot


def _layer_shapes(module: nn.Module) -> list[tuple[int, int]]:
    """``(input rows' width incl. the bias column, output width)`` of every Linear / Conv2d layer."""
    shapes = []
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            shapes.append((layer.in_features + int(layer.bias is not None), layer.out_features))
        elif isinstance(layer, nn.Conv2d):
            kernel = layer.in_channels // layer.groups * int(np.prod(layer.kernel_size))
            shapes.append((kernel + int(layer.bias is not None), layer.out_channels))
    return shapes


def kfac_bytes(module: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """K-FAC over ``module``'s Linear / Conv2d layers: per layer the running factors ``A`` and
    ``G`` and one batch's, their eigenvectors and eigenvalues, and the eigensolver's workspace
    (one more copy of the largest factor)."""
    shapes = _layer_shapes(module)
    if not shapes:
        return 0
    squares = [a * a + g * g for a, g in shapes]
    elements = sum(3 * sq + a + g for sq, (a, g) in zip(squares, shapes, strict=True))
    elements += max(max(a, g) ** 2 for a, g in shapes)
    return elements * _element_size(dtype)


def shampoo_bytes(
    shapes: Sequence[Sequence[int]], max_preconditioner_dim: int = 1024, dtype: torch.dtype = torch.float32
) -> int:
    """Shampoo's state for parameters of these shapes: momentum and grafting buffers, and per axis
    a ``(d, d)`` statistic and its inverse root (a length-``d`` diagonal above
    ``max_preconditioner_dim`` and for vectors), see :mod:`trpo_lab.optim.shampoo`."""
    elements = 0
    for shape in shapes:
        numel = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        elements += 2 * numel
        for size in shape:
            elements += 2 * size if len(shape) <= 1 or size > max_preconditioner_dim else 2 * size * size
    return elements * _element_size(dtype)


def exact_fisher_bytes(num_parameters: int, dtype: torch.dtype = torch.float32) -> int:
    """The dense Fisher of ``num_parameters`` parameters and its damped solve: the ``(P, P)``
    matrix, its damped copy and the solver's factorization (:mod:`trpo_lab.optim.exact`)."""
    return 3 * int(num_parameters) ** 2 * _element_size(dtype)


def _per_sample_activations(policy: nn.Module, observation_space: gym.Space[Any]) -> int:
    """Elements produced per sample by every leaf module of a forward of the features, actor and
    critic (one sample; on the meta device for a meta policy, so nothing is allocated)."""
    counts: list[int] = []

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            counts.append(output.numel())

    leaves = [m for m in policy.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        sample = observation_space.sample()
        device = next(policy.parameters()).device  # meta for the networks estimated before they exist
        obs = torch.zeros((1, *np.asarray(sample).shape), dtype=torch.float32, device=device)
        features = policy.preprocess(obs)  # type: ignore[operator]
        counts.append(features.numel())
        policy.actor(features)  # type: ignore[operator]
        policy.critic(features)  # type: ignore[operator]
    except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError):
        # A layout the meta forward cannot follow (e.g. Dict observations): the layer widths.
        counts = [g for _, g in _layer_shapes(policy)]
    finally:
        for hook in hooks:
            hook.remove()
    return int(sum(counts))


def network_bytes(
    policy: nn.Module, observation_space: gym.Space[Any], batch_size: int, optimizer_slots: int = 2
) -> dict[str, int]:
    """Parameters, gradients, optimizer state (``optimizer_slots`` copies of the parameters) and
    the activations of a batch of ``batch_size`` samples, all float32."""
    num_parameters = sum(p.numel() for p in policy.parameters())
    return {
        "parameters": 4 * num_parameters,
        "gradients": 4 * num_parameters,
        "optimizer state": 4 * num_parameters * optimizer_slots,
        "activations": 4 * ACTIVATION_COPIES * _per_sample_activations(policy, observation_space) * int(batch_size),
    }


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per part, grouped by the setting that sizes them (``parts[setting][part]``)."""

    parts: Mapping[str, Mapping[str, int]]

    def of(self, setting: str) -> int:
        return int(sum(self.parts.get(setting, {}).values()))

    @property
    def total(self) -> int:
        return sum(self.of(setting) for setting in self.parts)

    def describe(self) -> str:
        items = [(part, size) for group in self.parts.values() for part, size in group.items() if size > 0]
        items.sort(key=lambda item: -item[1])
        return ", ".join(f"{part} {format_bytes(size)}" for part, size in items[:4])


def _meta_policy(observation_space: gym.Space[Any], action_space: gym.Space[Any], policy_kwargs: Mapping[str, Any]) -> Any:
    from trpo_lab.nn.policy import ActorCritic

    with torch.device("meta"):
        return ActorCritic(observation_space, action_space, **policy_kwargs)


def estimate_agent_memory(
    config: AgentConfig, observation_space: gym.Space[Any], action_space: gym.Space[Any], n_envs: int
) -> MemoryEstimate:
    """What an agent with ``config`` on these spaces allocates, before it is built.

    ``policy_kwargs.net_arch`` sizes the networks and every curvature structure over them
    (K-FAC for ACKTR and ``curvature = "kfac"``, Shampoo for ``curvature = "shampoo"`` and
    PPO's ``optimizer = "shampoo"``, the dense Fisher for ``curvature = "exact"``, L-BFGS's
    history for ``critic_optimizer = "lbfgs"``); ``n_steps x n_envs`` sizes the rollout buffer
    and the activations of the update's batch.
    """
    policy = _meta_policy(observation_space, action_space, config.policy_kwargs)
    batch = int(config.n_steps) * int(n_envs)
    actor_params = sum(p.numel() for p in policy.actor_parameters())
    critic_params = sum(p.numel() for p in policy.critic_parameters())
    algo = type(config).algo
    curvature = getattr(config, "curvature", None)
    slots = 2  # Adam's moments (PPO, the TRPO / NPG critic); CG keeps a few actor vectors
    net = network_bytes(policy, observation_space, batch, optimizer_slots=slots)
    extra: dict[str, int] = {}
    if algo == "acktr":
        net["optimizer state"] = 4 * (actor_params + critic_params)  # K-FAC momentum
        extra["K-FAC factors"] = kfac_bytes(policy.actor) + kfac_bytes(policy.critic)
    elif curvature == "kfac":
        extra["K-FAC factors"] = kfac_bytes(policy.actor)
    elif curvature == "shampoo":
        extra["Shampoo preconditioners"] = shampoo_bytes([p.shape for p in policy.actor_parameters()])
    elif curvature == "exact":
        extra["exact Fisher"] = exact_fisher_bytes(actor_params)
    if getattr(config, "optimizer", None) == "shampoo":
        net["optimizer state"] = 0
        extra["Shampoo preconditioners"] = shampoo_bytes([p.shape for p in policy.parameters()])
    if getattr(config, "critic_optimizer", None) == "lbfgs":
        history = int(getattr(config, "critic_lbfgs_max_iter", 25))
        net["optimizer state"] = 4 * critic_params * (2 * history + 3)
    activations = net.pop("activations")
    return MemoryEstimate({
        "policy_kwargs.net_arch": {**net, **extra},
        "n_steps": {"rollout buffer": buffer_bytes(observation_space, action_space, config.n_steps, n_envs),
                    "activations": activations},
    })


def check_memory(
    needed: int, what: str, setting: str, value: object, device: torch.device | str = "cpu",
    max_memory: int | None = None, fits: Callable[[int], str | None] | None = None,
) -> None:
    """Refuse ``needed`` bytes for ``what`` when they exceed ``max_memory`` or the device's available memory.

    Args:
        needed: The estimate, in bytes.
        what: What needs it, for the message (``"a rollout buffer of 2048 x 8 slots"``).
        setting: The setting that sizes it (named by the error), and ``value`` its value.
        device: Whose memory counts.
        max_memory: The user's limit in bytes; default: what the device has available.
        fits: ``limit -> "what would fit"`` (a value of ``setting``), or ``None`` when nothing would.

    Raises:
        ValueError: ``Invalid <setting>: <value>; <what> needs an estimated <size>, more than ...``.
    """
    if max_memory is not None:
        limit: int | None = max_memory
        source = f"the max_memory limit of {format_bytes(max_memory)}"
    else:
        limit, where = available_memory(device)
        source = f"the {format_bytes(limit or 0)} of {where}"
    if limit is None or needed <= limit:
        return
    suggestion = fits(limit) if fits is not None else None
    hint = f"; {suggestion} would fit" if suggestion else ""
    raise ValueError(
        f"Invalid {setting}: {value!r}; {what} needs an estimated {format_bytes(needed)}, more than {source}{hint}"
        + ("" if max_memory is not None else " (or set max_memory to override the limit)")
    )


def _scaled_net_arch(net_arch: Any, scale: float) -> Any:
    def shrink(sizes: Sequence[int]) -> list[int]:
        return [max(1, int(size * scale)) for size in sizes]

    if isinstance(net_arch, Mapping):
        return {key: shrink(sizes) for key, sizes in net_arch.items()}
    return shrink(net_arch)


def check_agent_memory(
    config: AgentConfig,
    observation_space: gym.Space[Any],
    action_space: gym.Space[Any],
    n_envs: int,
    device: torch.device | str = "cpu",
    max_memory: int | None = None,
) -> MemoryEstimate:
    """Refuse an agent whose estimated memory (:func:`estimate_agent_memory`) does not fit.

    The error names the setting whose parts are the larger share (``policy_kwargs.net_arch``
    or ``n_steps``), the estimate with its largest parts, and a value of that setting that
    would fit: the hidden sizes scaled down, or the largest ``n_steps`` (``n_envs`` when
    even ``n_steps = 1`` does not fit).

    Returns:
        The estimate, when it fits.
    """
    if max_memory is None and getattr(config, "max_memory", None) is not None:
        max_memory = parse_memory(config.max_memory)
    estimate = estimate_agent_memory(config, observation_space, action_space, n_envs)

    def net_arch_fits(limit: int) -> str | None:
        net_arch = config.policy_kwargs.get("net_arch", {"pi": [64, 64], "vf": [64, 64]})
        low, high = 0.0, 1.0
        for _ in range(30):  # bisection on the width scale; each estimate builds a meta network
            middle = (low + high) / 2
            kwargs = {**config.policy_kwargs, "net_arch": _scaled_net_arch(net_arch, middle)}
            if estimate_agent_memory(config.replace(policy_kwargs=kwargs), observation_space, action_space,
                                     n_envs).total <= limit:
                low = middle
            else:
                high = middle
        return f"net_arch {_scaled_net_arch(net_arch, low)}" if low > 0 else None

    def n_steps_fits(limit: int) -> str | None:
        per_step = estimate.of("n_steps") / config.n_steps
        room = limit - estimate.of("policy_kwargs.net_arch")
        if room >= per_step:
            return f"n_steps {int(room // per_step)}"
        per_env = per_step / n_envs
        if room >= per_env:
            return f"n_steps 1 with n_envs {int(room // per_env)}"
        return None

    net, steps = estimate.of("policy_kwargs.net_arch"), estimate.of("n_steps")
    if net >= steps:
        setting, value, fits = "policy_kwargs.net_arch", config.policy_kwargs.get("net_arch", "default"), net_arch_fits
    else:
        setting, value, fits = "n_steps", config.n_steps, n_steps_fits
    what = f"this {type(config).algo or 'agent'} with n_envs {n_envs} ({estimate.describe()})"
    check_memory(estimate.total, what, setting, value, device, max_memory, fits)
    return estimate


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rollout_budget_note(total_timesteps: int, n_envs: int, n_steps: int) -> str | None:
    """Check a training budget against the rollout size, before any environment is built.

    Returns:
        ``None`` when the budget is a whole number of rollouts or more than one, else a one-line
        warning saying what will run: training stops after the update that reaches the budget,
        so a budget below one rollout still runs one full rollout of ``n_envs x n_steps`` steps.

    Raises:
        ValueError: ``n_envs`` above the budget (every environment could not take even one
            step of it), naming the most that would.
    """
    if n_envs > total_timesteps:
        raise invalid("n_envs", n_envs, f"at most the {total_timesteps} steps of the budget (total_timesteps), "
                                         "each update steps every environment n_steps times")
    rollout = n_envs * n_steps
    if total_timesteps >= rollout:
        return None
    updates = _ceil_div(total_timesteps, rollout)
    return (f"the budget of {total_timesteps} steps is less than one rollout (n_envs {n_envs} x n_steps {n_steps} "
            f"= {rollout} steps): {updates} update of {rollout} steps will run; lower n_steps to "
            f"{max(1, total_timesteps // n_envs)} to stay within it")
