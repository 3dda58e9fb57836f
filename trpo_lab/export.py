"""Export a trained agent's deterministic policy to ONNX (``trpo-lab export RUN_DIR --onnx FILE``).

The exported graph maps raw observations to the actions ``agent.predict(obs,
deterministic=True)`` returns, with everything ``predict`` does folded in:

1. observation normalization (``normalize_obs``): ``(obs - mean) / sqrt(var + eps)`` with the
   running statistics frozen at export time, computed in float64 as the Gymnasium wrapper
   does, then cast to float32;
2. the policy's feature extractor and actor network (:meth:`ActorCritic.preprocess`,
   :meth:`ActorCritic.dist_params`), in float32 (a Nature CNN trained with
   ``compute_dtype="bfloat16"`` is exported in float32: onnxruntime's convolutions take no
   bfloat16, and float32 is the more exact of the two);
3. the mode of the action distribution (:meth:`ActionDistribution.mode`): the argmax per
   component for ``Discrete`` / ``MultiDiscrete``, the mean for ``Box``;
4. ``Box`` actions clipped to the action space's bounds.

Inputs and outputs (batch dimension dynamic)::

    obs     float32 (batch, *obs_shape) for Box observations, int64 (batch,) for Discrete
    action  int64 (batch,) for Discrete, int64 (batch, k) for MultiDiscrete,
            float32 (batch, action_dim) for Box

The file carries metadata (``trpo_lab.algo``, ``trpo_lab.env_id``, the spaces) and is
written atomically. The export uses the public ``torch.onnx.export`` (the ``torch.export``
based exporter, which needs ``onnx`` and ``onnxscript``: ``pip install 'trpo-lab[export]'``).

Example::

    from trpo_lab import PPO
    from trpo_lab.export import export_onnx

    agent = PPO.load("runs/cartpole-ppo/final.pt")
    export_onnx(agent, "cartpole.onnx")

    import onnxruntime as ort
    session = ort.InferenceSession("cartpole.onnx")
    actions = session.run(["action"], {"obs": observations.astype("float32")})[0]
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers.vector import NormalizeObservation
from torch import Tensor, nn

from trpo_lab.envs import find_wrapper
from trpo_lab.logging import atomic_write_bytes
from trpo_lab.nn.extractors import NatureCNN

if TYPE_CHECKING:
    from trpo_lab.agents.base import OnPolicyAgent
    from trpo_lab.nn.policy import ActorCritic

__all__ = ["DeterministicPolicy", "export_onnx", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "obs"
OUTPUT_NAME = "action"


class DeterministicPolicy(nn.Module):
    """Raw observations -> the actions of ``agent.predict(obs, deterministic=True)``, as one module.

    A frozen copy of the agent's policy and of its observation-normalization statistics;
    later training of the agent does not change it.

    Args:
        agent: A trained agent (any algorithm).
    """

    obs_mean: Tensor
    obs_scale: Tensor
    action_low: Tensor
    action_high: Tensor

    def __init__(self, agent: OnPolicyAgent) -> None:
        super().__init__()
        import copy

        self.policy: ActorCritic = copy.deepcopy(agent.policy).cpu().eval()
        for param in self.policy.parameters():
            param.requires_grad_(False)
        for module in self.policy.modules():  # ONNX convolutions take no bfloat16 (onnxruntime)
            if isinstance(module, NatureCNN):
                module.compute_dtype = torch.float32
        self.box_observations = isinstance(agent.observation_space, gym.spaces.Box)
        wrapper = find_wrapper(agent.env, NormalizeObservation) if self.box_observations else None
        self.normalize = wrapper is not None
        if wrapper is not None:
            rms = wrapper.obs_rms
            self.register_buffer("obs_mean", torch.as_tensor(np.asarray(rms.mean, dtype=np.float64)))
            scale = np.sqrt(np.asarray(rms.var, dtype=np.float64) + wrapper.epsilon)
            self.register_buffer("obs_scale", torch.as_tensor(scale))
        self.clip = isinstance(agent.action_space, gym.spaces.Box)
        if self.clip:
            space = agent.action_space
            assert isinstance(space, gym.spaces.Box)
            self.register_buffer("action_low", torch.as_tensor(space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(space.high, dtype=torch.float32))

    def forward(self, obs: Tensor) -> Tensor:
        """Deterministic actions for a batch of raw observations."""
        if self.normalize:
            obs = ((obs.to(torch.float64) - self.obs_mean) / self.obs_scale).to(torch.float32)
        params = self.policy.dist_params(self.policy.preprocess(obs))
        actions = self.policy.distribution.mode(params)
        if self.clip:
            actions = torch.minimum(torch.maximum(actions, self.action_low), self.action_high)
        return actions


def _example_input(agent: OnPolicyAgent, batch: int = 2) -> Tensor:
    space = agent.observation_space
    if isinstance(space, gym.spaces.Discrete):
        return torch.zeros(batch, dtype=torch.int64)
    shape = tuple(space.shape or ())
    return torch.zeros((batch, *shape), dtype=torch.float32)


def _space_text(space: gym.Space[Any]) -> str:
    from trpo_lab.agents.checkpoint import space_signature

    return json.dumps(space_signature(space))


def export_onnx(agent: OnPolicyAgent, path: str | Path, opset_version: int | None = None) -> Path:
    """Write ``agent``'s deterministic policy (:class:`DeterministicPolicy`) as an ONNX file.

    Args:
        agent: The trained agent.
        path: The ``.onnx`` file to write (its folder is created; the file is replaced atomically).
        opset_version: ONNX opset; ``None`` lets ``torch.onnx`` choose.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``path`` cannot be written (naming the path and the reason), the
            ONNX exporter's dependencies (``onnx``, ``onnxscript``) are missing, or the agent
            has ``Dict`` observations (the ONNX graph has one input tensor).
    """
    if isinstance(agent.observation_space, gym.spaces.Dict):
        raise ValueError(
            f"Cannot export to ONNX a policy of Dict observations {agent.observation_space}: the exported graph "
            "takes one observation tensor (Box or Discrete); use agent.predict or the saved checkpoint instead"
        )
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise ValueError(
            f"Exporting to ONNX needs the onnx and onnxscript packages ({exc}); "
            "install them with: pip install 'trpo-lab[export]'"
        ) from None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Invalid ONNX output: {str(path)!r} is a folder; expected a file path such as policy.onnx")
    _check_writable(path)
    module = DeterministicPolicy(agent)
    example = _example_input(agent)
    batch = torch.export.Dim("batch")
    # The exporter reports its progress on stdout and logs and warns about its own internals.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"obs": {0: batch}},
            opset_version=opset_version,
            verbose=False,
        )
        exporter_log.setLevel(level)
    assert program is not None
    model = program.model_proto
    metadata = {
        "trpo_lab.algo": agent.algo,
        "trpo_lab.env_id": agent.env_id or "",
        "trpo_lab.observation_space": _space_text(agent.observation_space),
        "trpo_lab.action_space": _space_text(agent.action_space),
        "trpo_lab.normalize_obs": str(module.normalize).lower(),
        "trpo_lab.num_timesteps": str(agent.num_timesteps),
    }
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    try:
        atomic_write_bytes(path, model.SerializeToString())
    except OSError as exc:
        raise ValueError(f"Invalid ONNX output: {str(path)!r}; cannot write there ({exc.strerror or exc})") from None
    return path


def _check_writable(path: Path) -> None:
    """Fail before the (slow) export when ``path``'s folder cannot be created or written."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"Invalid ONNX output: {str(path)!r}; cannot write there ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"Invalid ONNX output: {str(path)!r}; cannot write there (Permission denied)")
