"""Features per observation space: the one place that turns observations into network inputs.

:func:`make_extractor` picks the extractor from the observation space (``"auto"``) or by
name, as Stable-Baselines3 does:

* a flat ``Box`` (any shape that is not an image) or a ``Discrete`` space:
  :class:`FlattenExtractor`, the flattened float32 vector (``Discrete`` one-hot). It has no
  parameters, so adding it to a policy leaves the policy's ``state_dict`` (and so its
  checkpoints, and the MLP's initialisation for a seed) unchanged.
  :meth:`FlattenExtractor.forward_numpy` is the same preprocessing on numpy arrays, for the
  CPU rollout (tested equal to :meth:`FlattenExtractor.forward`);
* an image ``Box`` (:func:`is_image_space`: uint8, 3-D, values in [0, 255], channels first
  or last): :class:`NatureCNN` (Mnih et al., 2015), which scales by 1/255 inside the network
  so that the rollout buffer stores the uint8 frames;
* a ``Dict`` of such spaces: :class:`CombinedExtractor`, one extractor per key (NatureCNN for
  images, flattening for the rest), concatenated in sorted key order (SB3's
  ``CombinedExtractor``).

Any ``nn.Module`` class ``cls(observation_space, **features_extractor_kwargs)`` with an
integer ``features_dim`` attribute may be given instead.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from trpo_lab.nn.distributions import check_start

__all__ = [
    "EXTRACTORS",
    "COMPUTE_DTYPES",
    "CombinedExtractor",
    "FlattenExtractor",
    "NatureCNN",
    "as_tensors",
    "features_dim",
    "check_observation_space",
    "is_image_space",
    "make_extractor",
    "uses_flat_features",
]

EXTRACTORS = ("auto", "mlp", "nature_cnn")
"""The names ``policy_kwargs.features_extractor`` accepts (or an ``nn.Module`` class)."""

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The names ``features_extractor_kwargs.compute_dtype`` accepts for the Nature CNN."""

_ACCEPTED = (
    "Box and Discrete (a Box of uint8 images, H x W x C or C x H x W in [0, 255], goes through a CNN), "
    "or a Dict of those (not nested)"
)


def is_image_space(space: gym.Space[Any], normalize_images: bool = True) -> bool:
    """Whether ``space`` holds images, as SB3's ``is_image_space`` decides.

    An image is a 3-D ``Box`` of dtype uint8 whose smallest dimension (the channels) comes
    first or last; with ``normalize_images`` its bounds must also be [0, 255] (the network
    divides by 255). With ``normalize_images=False`` any 3-D uint8 ``Box`` counts.
    """
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 3 or space.dtype != np.uint8:
        return False
    if normalize_images and (np.any(space.low != 0) or np.any(space.high != 255)):
        return False
    return int(np.argmin(space.shape)) in (0, 2)


def _channels_first(space: gym.spaces.Box) -> bool:
    """Channels-first layout: the smallest dimension comes first (ties go to channels first)."""
    return int(np.argmin(space.shape)) == 0


def check_observation_space(space: gym.Space[Any], key: str | None = None) -> None:
    """Raise a ``ValueError`` naming the space (and the Dict key) unless an extractor can read it."""
    where = f" at key {key!r}" if key is not None else ""
    if isinstance(space, gym.spaces.Dict):
        if key is not None:
            raise ValueError(f"Unsupported observation space {space}{where}: a nested Dict; supported: {_ACCEPTED}")
        if not space.spaces:
            raise ValueError(f"Unsupported observation space {space}: an empty Dict; supported: {_ACCEPTED}")
        for sub_key, sub_space in space.spaces.items():
            check_observation_space(sub_space, str(sub_key))
        return
    if isinstance(space, gym.spaces.Discrete):
        check_start(space, "observation")
        return
    if isinstance(space, gym.spaces.Box):
        return
    raise ValueError(f"Unsupported observation space {space}{where}; supported: {_ACCEPTED}")


def uses_flat_features(space: gym.Space[Any], features_extractor: Any = "auto", normalize_images: bool = True) -> bool:
    """Whether the policy for ``space`` runs its MLPs on :class:`FlattenExtractor` features."""
    if features_extractor == "mlp":
        return True
    if features_extractor != "auto":
        return False
    return not isinstance(space, gym.spaces.Dict) and not is_image_space(space, normalize_images)


class FlattenExtractor(nn.Module):
    """Flat features: ``Box`` observations flattened, ``Discrete`` ones one-hot, as float32.

    Args:
        observation_space: A ``Box`` (any shape) or a ``Discrete`` space starting at 0.

    Attributes:
        features_dim: Width of the features (the networks' input size).
        one_hot: Whether observations are ``Discrete`` indices encoded one-hot.

    Raises:
        ValueError: for any other observation space.
    """

    def __init__(self, observation_space: gym.Space) -> None:  # type: ignore[type-arg]
        super().__init__()
        if isinstance(observation_space, gym.spaces.Box):
            self.features_dim = int(np.prod(observation_space.shape))
            self.one_hot = False
        elif isinstance(observation_space, gym.spaces.Discrete):
            check_start(observation_space, "observation")
            self.features_dim = int(observation_space.n)
            self.one_hot = True
        else:
            raise ValueError(
                f"Unsupported observation space {observation_space} for the flat (mlp) extractor; "
                "supported: Box and Discrete (a Dict takes features_extractor='auto')"
            )
        self._eye = np.eye(self.features_dim, dtype=np.float32) if self.one_hot else None

    def forward(self, obs: Tensor) -> Tensor:
        """Features ``(batch, features_dim)`` of a batch of raw observations."""
        if self.one_hot:  # a comparison, not F.one_hot, whose range check cannot run under vmap (exact curvature)
            classes = torch.arange(self.features_dim, device=obs.device)
            return (obs.long().reshape(-1, 1) == classes).to(torch.float32)
        if obs.dim() != 2:
            obs = obs.reshape(obs.shape[0], -1)
        return obs if obs.dtype == torch.float32 else obs.to(torch.float32)

    def forward_numpy(self, obs: NDArray[np.generic]) -> NDArray[np.float32]:
        """:meth:`forward` on a numpy batch (a view of ``obs`` where no conversion is needed)."""
        if self._eye is not None:
            one_hot: NDArray[np.float32] = self._eye[obs.reshape(-1).astype(np.int64, copy=False)]
            return one_hot
        x = obs.reshape(obs.shape[0], -1)
        return x.astype(np.float32, copy=False)


def _compute_dtype(name: Any) -> torch.dtype:
    """The torch dtype of a ``compute_dtype`` name, or a ValueError saying what is accepted."""
    if not isinstance(name, str) or name not in COMPUTE_DTYPES:
        hint = " (float16 would need loss scaling, which the agents do not do)" if name == "float16" else ""
        raise ValueError(
            f"Invalid features_extractor_kwargs.compute_dtype: {name!r}; expected one of {list(COMPUTE_DTYPES)}{hint}"
        )
    return COMPUTE_DTYPES[name]


@functools.cache
def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions for oneDNN's convolutions (AVX512-BF16 or AMX).

    Without them oneDNN emulates bfloat16: on such a CPU (an AMD EPYC without AVX512-BF16) the
    Nature CNN's forward and backward of 256 Atari frames took 12.8 times as long as in float32.
    True when torch cannot tell (no oneDNN query), so that nothing is claimed."""
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return True if query is None else bool(query())
    except RuntimeError:
        return True


class NatureCNN(nn.Module):
    """The DQN network's convolutional trunk (Mnih et al., 2015), as in SB3 and OpenAI baselines.

        x = obs / 255                     (``normalize_images``; uint8 in, float inside)
        conv 32 × 8×8 stride 4, ReLU → conv 64 × 4×4 stride 2, ReLU → conv 64 × 3×3 stride 1, ReLU
        → flatten → Linear(features_dim), ReLU

    Channels-last images (H × W × C) are permuted to C × H × W inside :meth:`forward`, so the
    buffer and the environment keep their own layout. Weights are orthogonal with gain √2,
    biases zero (the A2C / PPO Atari initialisation).

    Args:
        observation_space: An image ``Box`` (3-D, smallest dimension first or last), at
            least 36 × 36 pixels (the three convolutions' receptive field).
        features_dim: Width of the output features (512, the paper's).
        normalize_images: Divide by 255 inside the network (the space must then be uint8 in
            [0, 255]); ``False`` for images that are already scaled.
        compute_dtype: ``"float32"`` (default) or ``"bfloat16"``: the convolutions and the
            linear layer run under ``torch.autocast`` in bfloat16 (weights, their gradients and
            the returned features stay float32, and so do the heads, losses, log-probabilities
            and the K-FAC statistics downstream). The features differ from float32's by about
            0.5%. On a CPU with bfloat16 instructions (AVX512-BF16 here) the forward and backward
            of 256 Atari frames take 0.57 times as long as in float32; on one without them,
            bfloat16 is emulated and many times slower, and the first forward on such a CPU
            warns (:func:`cpu_has_native_bfloat16`).

    Raises:
        ValueError: a space that is not a 3-D Box, images too small for the network, or an
            unknown ``compute_dtype``.
    """

    def __init__(
        self,
        observation_space: gym.Space[Any],
        features_dim: int = 512,
        normalize_images: bool = True,
        compute_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.compute_dtype = _compute_dtype(compute_dtype)
        self._check_cpu_bfloat16 = self.compute_dtype == torch.bfloat16  # cleared by the first forward on a CPU
        if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 3:
            raise ValueError(
                f"Unsupported observation space {observation_space} for nature_cnn; expected a 3-D image Box "
                "(H x W x C or C x H x W)"
            )
        if normalize_images and not is_image_space(observation_space):
            raise ValueError(
                f"Unsupported observation space {observation_space} for nature_cnn with normalize_images=True: "
                "expected dtype uint8 with bounds [0, 255] and channels first or last; pass normalize_images=False "
                "for images that are already scaled"
            )
        if not isinstance(features_dim, int) or isinstance(features_dim, bool) or features_dim < 1:
            raise ValueError(f"Invalid features_extractor_kwargs.features_dim: {features_dim!r}; expected an integer >= 1")
        self.channels_first = _channels_first(observation_space)
        shape = observation_space.shape
        channels, height, width = shape if self.channels_first else (shape[2], shape[0], shape[1])
        if min(height, width) < 36:
            raise ValueError(
                f"Unsupported observation space {observation_space} for nature_cnn: images of {height} x {width} "
                "pixels; the network needs at least 36 x 36"
            )
        self.normalize_images = normalize_images
        self.features_dim = features_dim
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = int(self.cnn(torch.zeros(1, channels, height, width)).shape[1])
        self.linear = nn.Sequential(nn.Linear(n_flat, features_dim), nn.ReLU())
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(module.weight, gain=float(np.sqrt(2.0)))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _warn_if_bfloat16_is_emulated(self) -> None:
        """Once, on the first bfloat16 forward on a CPU: warn if oneDNN emulates bfloat16 there."""
        self._check_cpu_bfloat16 = False
        if not cpu_has_native_bfloat16():
            warnings.warn(
                "features_extractor_kwargs.compute_dtype='bfloat16' on a CPU without bfloat16 instructions "
                "(AVX512-BF16 or AMX): oneDNN emulates them, and the Nature CNN runs many times slower than in "
                "float32 (12.8x for the forward and backward of 256 Atari frames on one such CPU); use 'float32' here",
                UserWarning,
                stacklevel=3,
            )

    def forward(self, obs: Tensor) -> Tensor:
        """Features ``(batch, features_dim)`` of a batch of raw images (any dtype)."""
        if self._check_cpu_bfloat16 and obs.device.type == "cpu":
            self._warn_if_bfloat16_is_emulated()
        if not self.channels_first:
            obs = obs.permute(0, 3, 1, 2)
        # Channels-last activations (the values, not the weights, whose layout stays contiguous)
        # take the CPU's fast convolution kernels: on one core the forward and backward of a
        # minibatch of 256 Atari frames run in 0.13 s instead of 0.21 s, with the same results
        # up to rounding. The cast, the layout change and the scaling take two passes over the
        # batch (a copy, then an in-place division of that copy), not three.
        # In bfloat16 the pixels 0-255 are exact and the division rounds once, as autocast's
        # own cast of a float32 input would.
        x = obs.to(self.compute_dtype, memory_format=torch.channels_last, copy=True)
        if self.normalize_images:
            x = x.div_(255.0)
        if self.compute_dtype == torch.float32:
            features: Tensor = self.linear(self.cnn(x))
            return features
        with torch.autocast(device_type=x.device.type, dtype=self.compute_dtype):
            features = self.linear(self.cnn(x))
        return features.float()


class CombinedExtractor(nn.Module):
    """One extractor per key of a ``Dict`` observation, concatenated (SB3's ``CombinedExtractor``).

    Images (:func:`is_image_space`) go through a :class:`NatureCNN` of ``cnn_output_dim``
    features, every other key is flattened (``Discrete`` one-hot); the features are
    concatenated in sorted key order (the order of ``gym.spaces.Dict``).

    Args:
        observation_space: A ``Dict`` of Box / Discrete spaces (no nesting).
        cnn_output_dim: Features per image key (256, SB3's default).
        normalize_images: Passed to each :class:`NatureCNN` (and to :func:`is_image_space`).
        compute_dtype: Passed to each :class:`NatureCNN`.

    Raises:
        ValueError: a nested Dict or an unsupported space at some key, naming the key.
    """

    def __init__(
        self,
        observation_space: gym.Space[Any],
        cnn_output_dim: int = 256,
        normalize_images: bool = True,
        compute_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if not isinstance(observation_space, gym.spaces.Dict):
            raise ValueError(f"Unsupported observation space {observation_space} for the Dict extractor; expected a Dict")
        check_observation_space(observation_space)
        _compute_dtype(compute_dtype)
        extractors: dict[str, nn.Module] = {}
        for key, space in observation_space.spaces.items():
            if is_image_space(space, normalize_images):
                extractors[key] = NatureCNN(
                    space, features_dim=cnn_output_dim, normalize_images=normalize_images, compute_dtype=compute_dtype
                )
            else:
                extractors[key] = FlattenExtractor(space)
        self.extractors = nn.ModuleDict(extractors)
        self.keys = list(extractors)
        self.features_dim = sum(features_dim(e) for e in extractors.values())

    def forward(self, obs: Mapping[str, Tensor]) -> Tensor:
        """Concatenated features ``(batch, features_dim)`` of a dict of observation batches."""
        return torch.cat([self.extractors[key](obs[key]) for key in self.keys], dim=1)


def features_dim(extractor: nn.Module) -> int:
    """The width of an extractor's output features (its ``features_dim`` attribute)."""
    dim: Any = getattr(extractor, "features_dim", None)
    return int(dim)


def as_tensors(obs: Any, device: torch.device | str) -> Any:
    """A batch of observations as tensors on ``device``: a tensor, or a dict of them for Dict spaces."""
    if isinstance(obs, Mapping):
        return {key: torch.as_tensor(value, device=device) for key, value in obs.items()}
    return torch.as_tensor(obs, device=device)


def make_extractor(
    observation_space: gym.Space[Any],
    features_extractor: Any = "auto",
    features_extractor_kwargs: Mapping[str, Any] | None = None,
    normalize_images: bool = True,
) -> nn.Module:
    """The feature extractor for an observation space.

    Args:
        observation_space: The environment's (single) observation space.
        features_extractor: ``"auto"`` (from the space: flat, image or Dict, see the module
            docstring), ``"mlp"`` (:class:`FlattenExtractor`), ``"nature_cnn"`` or an
            ``nn.Module`` class taking ``(observation_space, **kwargs)`` with a ``features_dim``.
        features_extractor_kwargs: Keyword arguments for the extractor's constructor.
        normalize_images: Whether images are divided by 255 inside the network.

    Raises:
        ValueError: an unsupported space (naming the Dict key), an unknown extractor name,
            or kwargs the extractor does not accept.
    """
    check_observation_space(observation_space)
    kwargs = dict(features_extractor_kwargs or {})
    if features_extractor == "auto":
        if isinstance(observation_space, gym.spaces.Dict):
            return CombinedExtractor(observation_space, normalize_images=normalize_images, **kwargs)
        if is_image_space(observation_space, normalize_images):
            return NatureCNN(observation_space, normalize_images=normalize_images, **kwargs)
        features_extractor = "mlp"
    if features_extractor == "mlp":
        if kwargs:
            raise ValueError(f"Invalid policy_kwargs.features_extractor_kwargs {kwargs}; the mlp extractor takes none")
        return FlattenExtractor(observation_space)
    if features_extractor == "nature_cnn":
        return NatureCNN(observation_space, normalize_images=normalize_images, **kwargs)
    if isinstance(features_extractor, type) and issubclass(features_extractor, nn.Module):
        module = features_extractor(observation_space, **kwargs)
        dim = getattr(module, "features_dim", None)
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(
                f"Invalid policy_kwargs.features_extractor {features_extractor.__name__}: its instances need an "
                f"integer features_dim >= 1, got {dim!r}"
            )
        return module
    raise ValueError(
        f"Invalid policy_kwargs.features_extractor: {features_extractor!r}; expected one of {list(EXTRACTORS)} "
        "or an nn.Module class"
    )
