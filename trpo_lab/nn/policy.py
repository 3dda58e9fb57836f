"""The actor-critic policy: ONE definition of its networks, and its policy_kwargs.

The networks are two MLPs (actor and critic) over the features of
:mod:`trpo_lab.nn.extractors`, held as ``nn.Sequential`` modules so that their parameters
have stable names (the checkpoint format) and K-FAC finds their ``nn.Linear`` layers.
Every forward pass is the one function :func:`mlp_forward` over ``(weight, bias)`` pairs:

* :meth:`ActorCritic.dist_params` and :meth:`ActorCritic.value` call it on the modules'
  parameters (the reference definition);
* :meth:`ActorCritic.dist_params_from_flat` on views of a flat vector, a pure function that
  ``torch.func.vmap`` maps over the candidates of the batched line search;
* :meth:`ActorCritic.traced_forward` with a trace of every layer's input and output, for
  K-FAC's hook-free Fisher pass;
* the rollout's acting paths (:mod:`trpo_lab.nn.acting`) on block-diagonal stacks of the
  same parameters (one pass for actor and critic), in torch or in numpy, tested equal to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch
from torch import Tensor, nn

from trpo_lab.nn.distributions import ActionDistribution, Categorical, DiagGaussian, make_distribution
from trpo_lab.nn.extractors import EXTRACTORS, check_observation_space, features_dim, make_extractor, uses_flat_features
from trpo_lab.validation import is_number

if TYPE_CHECKING:
    from trpo_lab.nn.acting import NoiseStream, RolloutActor

__all__ = [
    "ACTIVATIONS",
    "POLICY_KWARGS",
    "ActorCritic",
    "Layer",
    "mlp_backward",
    "mlp_forward",
    "mlp_forward_cached",
    "mlp_jvp",
    "mlp_mse_gradients",
    "resolve_activation",
    "validate_policy_kwargs",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}

POLICY_KWARGS = (
    "net_arch",
    "activation_fn",
    "log_std_init",
    "ortho_init",
    "features_extractor",
    "features_extractor_kwargs",
    "share_features_extractor",
    "normalize_images",
)

Layer = tuple[Tensor, Tensor]
"""``(weight, bias)`` of one linear layer, ``weight`` of shape ``(out, in)`` as in ``nn.Linear``."""

Activation = Callable[[Tensor], Tensor]

# The functions the built-in modules compute (the same bits, without a module call).
_FUNCTIONAL: dict[type[nn.Module], Activation] = {nn.Tanh: torch.tanh, nn.ReLU: torch.relu}


def mlp_forward(
    layers: Sequence[Layer],
    activations: Sequence[Activation],
    x: Tensor,
    trace: list[tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """The MLP of every policy network: ``x_{k+1} = σ_k(W_k x_k + b_k)``, no σ after the last layer.

    Args:
        layers: ``(weight, bias)`` per linear layer.
        activations: One callable per hidden layer (``len(layers) - 1``).
        x: Inputs ``(batch, in)``.
        trace: If given, ``(input, output)`` of every linear layer is appended to it.
    """
    last = len(layers) - 1
    for i, (weight, bias) in enumerate(layers):
        y = nn.functional.linear(x, weight, bias)
        if trace is not None:
            trace.append((x, y))
        x = activations[i](y) if i < last else y
    return x


def _tanh_derivative(pre: Tensor, out: Tensor) -> Tensor:
    return out.mul(out).neg_().add_(1.0)  # 1 - tanh(z)^2, from the output


def _relu_derivative(pre: Tensor, out: Tensor) -> Tensor:
    return (pre > 0).to(pre.dtype)  # the mask autograd uses (1 where the input is > 0)


_DERIVATIVES: dict[Activation, Callable[[Tensor, Tensor], Tensor]] = {
    torch.tanh: _tanh_derivative,
    torch.relu: _relu_derivative,
}


MLPCache = tuple[list[Tensor], list[Tensor]]
"""What :func:`mlp_backward` needs of a forward: every linear layer's input, and the hidden layers' pre-activations."""


def mlp_forward_cached(
    layers: Sequence[Layer], activations: Sequence[Activation], x: Tensor
) -> tuple[Tensor, MLPCache] | None:
    """:func:`mlp_forward` without a graph, keeping what :func:`mlp_backward` needs; None when an
    activation is not tanh or ReLU (the caller then takes autograd)."""
    if any(a not in _DERIVATIVES for a in activations):
        return None
    with torch.no_grad():
        inputs, pre = [x], []
        for i, (weight, bias) in enumerate(layers):
            z = torch.addmm(bias, inputs[-1], weight.mT)
            if i < len(layers) - 1:
                pre.append(z)
                inputs.append(activations[i](z))
    return z, (inputs, pre)


def mlp_backward(
    layers: Sequence[Layer], activations: Sequence[Activation], cache: MLPCache, grad_output: Tensor
) -> list[Tensor]:
    """The gradient of a loss with respect to every ``(W, b)`` of :func:`mlp_forward_cached`'s
    MLP, given the gradient ``grad_output`` with respect to its output: the chain rule written out.

    ``∇W_k = δ_kᵀ x_k``, ``∇b_k = Σ δ_k``, ``δ_{k−1} = (δ_k W_k) ⊙ σ'(z_{k−1})``, with σ' from the
    layer's output for tanh (``1 − x²``) and from its input for ReLU. On a CPU autograd's graph
    and engine cost more than the arithmetic of a 64 x 64 MLP, and the agents take hundreds of
    small minibatch steps per update (TRPO's critic fit, PPO's epochs); tested equal to autograd.

    Returns:
        ``[∇W_0, ∇b_0, ∇W_1, ...]``, detached.
    """
    inputs, pre = cache
    with torch.no_grad():
        delta = grad_output
        grads: list[Tensor] = []
        for i in range(len(layers) - 1, -1, -1):
            grads += [delta.sum(0), delta.mT @ inputs[i]]  # reversed below: (W, b) per layer
            if i > 0:
                delta = (delta @ layers[i][0]).mul_(_DERIVATIVES[activations[i - 1]](pre[i - 1], inputs[i]))
        grads.reverse()
    return grads


def mlp_jvp(
    layers: Sequence[Layer], activations: Sequence[Activation], cache: MLPCache, tangents: Sequence[Layer]
) -> Tensor:
    """The change of :func:`mlp_forward_cached`'s output along the parameter direction
    ``tangents`` (one ``(dW, db)`` per layer): forward-mode differentiation written out.

    ``ż_k = ẋ_k W_kᵀ + x_k dW_kᵀ + db_k`` and ``ẋ_{k+1} = σ'(z_k) ⊙ ż_k`` (``ẋ_0 = 0``: the
    input does not move), with σ' as in :func:`mlp_backward`. Tested equal to autograd's
    ``torch.func.jvp``.
    """
    inputs, pre = cache
    with torch.no_grad():
        moved: Tensor | None = None
        for i, ((weight, _), (d_weight, d_bias)) in enumerate(zip(layers, tangents, strict=True)):
            change = torch.addmm(d_bias, inputs[i], d_weight.mT)
            if moved is not None:
                change.addmm_(moved, weight.mT)
            if i < len(layers) - 1:
                moved = change.mul_(_DERIVATIVES[activations[i]](pre[i], inputs[i + 1]))
    return change


def mlp_mse_gradients(
    layers: Sequence[Layer], activations: Sequence[Activation], x: Tensor, targets: Tensor
) -> tuple[Tensor, list[Tensor]] | None:
    """``mean((mlp(x) − y)²)`` of a one-output :func:`mlp_forward` and its gradient, by hand
    (:func:`mlp_backward` of ``δ_L = 2(v − y)/n``): TRPO's and NPG's critic fit.

    Returns:
        ``(loss, [∇W_0, ∇b_0, ∇W_1, ...])``, detached; None when an activation is not tanh or
        ReLU or the MLP has more than one output (the caller then takes autograd).
    """
    if layers[-1][0].shape[0] != 1:
        return None
    forward = mlp_forward_cached(layers, activations, x)
    if forward is None:
        return None
    output, cache = forward
    with torch.no_grad():
        error = output.squeeze(-1) - targets
        loss = error.square().mean()
        delta = error.mul(2.0 / error.numel()).unsqueeze(-1)
    return loss, mlp_backward(layers, activations, cache, delta)


def _mlp(sizes: Sequence[int], activation: type[nn.Module], out_gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        linear = nn.Linear(sizes[i], sizes[i + 1])
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, gain=out_gain if last else math.sqrt(2.0))
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)


def validate_policy_kwargs(policy_kwargs: Mapping[str, Any]) -> None:
    """Check ``policy_kwargs`` without building a network (configs call this).

    Raises:
        ValueError: an unknown key, or a value :class:`ActorCritic` would reject, naming both.
    """
    unknown = sorted(set(policy_kwargs) - set(POLICY_KWARGS))
    if unknown:
        raise ValueError(f"Invalid policy_kwargs key(s) {unknown}; expected some of {list(POLICY_KWARGS)}")
    if "net_arch" in policy_kwargs:
        _parse_net_arch(policy_kwargs["net_arch"])
    if "activation_fn" in policy_kwargs:
        resolve_activation(policy_kwargs["activation_fn"])
    if "log_std_init" in policy_kwargs and not is_number(policy_kwargs["log_std_init"]):
        raise ValueError(f"Invalid policy_kwargs.log_std_init: {policy_kwargs['log_std_init']!r}; expected a finite number")
    for flag in ("ortho_init", "share_features_extractor", "normalize_images"):
        if flag in policy_kwargs and not isinstance(policy_kwargs[flag], bool):
            raise ValueError(f"Invalid policy_kwargs.{flag}: {policy_kwargs[flag]!r}; expected true or false")
    if "features_extractor" in policy_kwargs:
        extractor = policy_kwargs["features_extractor"]
        is_class = isinstance(extractor, type) and issubclass(extractor, nn.Module)
        if not is_class and extractor not in EXTRACTORS:
            raise ValueError(
                f"Invalid policy_kwargs.features_extractor: {extractor!r}; expected one of {list(EXTRACTORS)} "
                "or an nn.Module class"
            )
    kwargs = policy_kwargs.get("features_extractor_kwargs", {})
    if not (isinstance(kwargs, Mapping) and all(isinstance(key, str) for key in kwargs)):
        raise ValueError(
            f"Invalid policy_kwargs.features_extractor_kwargs: {kwargs!r}; expected a dict of keyword arguments"
        )


def _parse_net_arch(net_arch: Any) -> tuple[list[int], list[int]]:
    if isinstance(net_arch, dict):
        unknown = sorted(set(net_arch) - {"pi", "vf"})
        if unknown:
            raise ValueError(f"Invalid policy_kwargs.net_arch key(s) {unknown}; expected 'pi' and/or 'vf'")
        pi, vf = net_arch.get("pi", [64, 64]), net_arch.get("vf", [64, 64])
    elif isinstance(net_arch, (list, tuple)):
        pi = vf = list(net_arch)
    else:
        raise ValueError(f"Invalid policy_kwargs.net_arch: {net_arch!r}; expected a list of sizes or dict(pi=[...], vf=[...])")
    for name, sizes in (("pi", pi), ("vf", vf)):
        positive = isinstance(sizes, (list, tuple)) and all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
        )
        if not positive:
            raise ValueError(f"Invalid policy_kwargs.net_arch {name}: {sizes!r}; expected positive integers")
    return list(pi), list(vf)


def resolve_activation(activation_fn: str | type[nn.Module]) -> type[nn.Module]:
    """Accept an activation by name (as in TOML presets) or as an ``nn.Module`` class."""
    if isinstance(activation_fn, str):
        key = activation_fn.lower().removeprefix("nn.")
        if key not in ACTIVATIONS:
            raise ValueError(
                f"Invalid policy_kwargs.activation_fn: {activation_fn!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        return ACTIVATIONS[key]
    if isinstance(activation_fn, type) and issubclass(activation_fn, nn.Module):
        return activation_fn
    raise ValueError(f"Invalid policy_kwargs.activation_fn: {activation_fn!r}; expected a name or nn.Module class")


class ActorCritic(nn.Module):
    """Actor and critic MLPs over the features of an observation, with orthogonal initialisation.

    Args:
        observation_space: ``Box`` (flat or image), ``Discrete`` (one-hot) or a ``Dict`` of
            those (see :mod:`trpo_lab.nn.extractors`).
        action_space: ``Discrete``, 1-D ``Box`` or ``MultiDiscrete``.
        net_arch: Hidden sizes, shared by both networks, or ``dict(pi=[...], vf=[...])``.
            Default ``dict(pi=[64, 64], vf=[64, 64])``.
        activation_fn: ``"tanh"`` (default), ``"relu"``, ... or an ``nn.Module`` class.
        log_std_init: Initial state-independent log standard deviation (Box actions).
        ortho_init: Orthogonal init (gain sqrt(2) hidden, 0.01 policy head, 1 value head).
        features_extractor: ``"auto"`` (default: from the observation space), ``"mlp"``,
            ``"nature_cnn"`` or an ``nn.Module`` class (see :func:`~trpo_lab.nn.extractors.make_extractor`).
        features_extractor_kwargs: Keyword arguments of the extractor (``features_dim``, ...).
        share_features_extractor: With an extractor that has parameters (a CNN), one trunk
            for actor and critic (the A2C / ACKTR Atari network) instead of one each
            (default ``False``). Flat features have no parameters, so it changes nothing there.
        normalize_images: Divide uint8 images by 255 inside the network (default ``True``).

    The actor's and critic's parameters are the explicit groups :meth:`actor_parameters`
    and :meth:`critic_parameters` (each network's own extractor first); a shared trunk's
    are :meth:`trunk_parameters`. Every method that takes ``obs`` except :meth:`act` and
    :meth:`forward` takes :meth:`preprocess` of raw observations: the flat features for flat
    spaces, the raw (uint8) tensors otherwise, which the extractors read inside the networks.
    """

    def __init__(
        self,
        observation_space: gym.Space,  # type: ignore[type-arg]
        action_space: gym.Space,  # type: ignore[type-arg]
        net_arch: Any = None,
        activation_fn: str | type[nn.Module] = "tanh",
        log_std_init: float = 0.0,
        ortho_init: bool = True,
        features_extractor: Any = "auto",
        features_extractor_kwargs: Mapping[str, Any] | None = None,
        share_features_extractor: bool = False,
        normalize_images: bool = True,
    ) -> None:
        super().__init__()
        check_observation_space(observation_space)
        self.distribution: ActionDistribution = make_distribution(action_space)
        self.flat_features = uses_flat_features(observation_space, features_extractor, normalize_images)
        """Whether the MLPs read :class:`FlattenExtractor` features (no extractor parameters)."""
        self.share_features_extractor = bool(share_features_extractor) and not self.flat_features
        self.pi_features_extractor: nn.Module | None = None
        self.vf_features_extractor: nn.Module | None = None

        def extractor() -> nn.Module:
            try:
                return make_extractor(observation_space, features_extractor, features_extractor_kwargs, normalize_images)
            except TypeError as exc:
                raise ValueError(f"Invalid policy_kwargs.features_extractor_kwargs {features_extractor_kwargs}: {exc}") from None

        if self.flat_features or self.share_features_extractor:
            self.features_extractor: nn.Module = extractor()
            self.obs_dim = features_dim(self.features_extractor)
        else:
            self.features_extractor = nn.Identity()
            self.pi_features_extractor = extractor()
            self.vf_features_extractor = extractor()
            self.obs_dim = features_dim(self.pi_features_extractor)
        pi_arch, vf_arch = _parse_net_arch(net_arch if net_arch is not None else {"pi": [64, 64], "vf": [64, 64]})
        activation = resolve_activation(activation_fn)
        self.is_gaussian = isinstance(self.distribution, DiagGaussian)
        n_outputs = self.distribution.param_dim // 2 if self.is_gaussian else self.distribution.param_dim
        self.actor = _mlp([self.obs_dim, *pi_arch, n_outputs], activation, out_gain=0.01)
        self.critic = _mlp([self.obs_dim, *vf_arch, 1], activation, out_gain=1.0)
        if not ortho_init:
            for module in (*self.actor, *self.critic):
                if isinstance(module, nn.Linear):
                    module.reset_parameters()
        self.log_std = nn.Parameter(torch.full((n_outputs,), float(log_std_init))) if self.is_gaussian else None
        self.actor_linears: list[nn.Linear] = [m for m in self.actor if isinstance(m, nn.Linear)]
        self.critic_linears: list[nn.Linear] = [m for m in self.critic if isinstance(m, nn.Linear)]
        self.actor_activations = [_functional(m) for m in self.actor if not isinstance(m, nn.Linear)]
        self.critic_activations = [_functional(m) for m in self.critic if not isinstance(m, nn.Linear)]
        self._pi_extractor_names = (
            [name for name, _ in self.pi_features_extractor.named_parameters()] if self.pi_features_extractor else []
        )

    # ------------------------------------------------------------------ parameters
    def actor_modules(self) -> list[nn.Module]:
        """The modules of the actor's own layers: its extractor (if it has one), then its MLP."""
        return [m for m in (self.pi_features_extractor, self.actor) if m is not None]

    def critic_modules(self) -> list[nn.Module]:
        """The modules of the critic's own layers: its extractor (if it has one), then its MLP."""
        return [m for m in (self.vf_features_extractor, self.critic) if m is not None]

    def actor_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the action distribution (a shared trunk aside): the actor's
        extractor and layers, then ``log_std``."""
        params = [p for module in self.actor_modules() for p in module.parameters()]
        if self.log_std is not None:
            params.append(self.log_std)
        return params

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's parameters (its extractor's, then its layers')."""
        return [p for module in self.critic_modules() for p in module.parameters()]

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The shared extractor's parameters (empty unless ``share_features_extractor`` with a CNN)."""
        return list(self.features_extractor.parameters()) if self.share_features_extractor else []

    def actor_shapes(self) -> list[torch.Size]:
        """Shapes of :meth:`actor_parameters`, the layout of a flat actor vector."""
        return [p.shape for p in self.actor_parameters()]

    def actor_layers(self) -> list[Layer]:
        """``(weight, bias)`` of the actor's linear layers."""
        return [(m.weight, m.bias) for m in self.actor_linears]

    def critic_layers(self) -> list[Layer]:
        """``(weight, bias)`` of the critic's linear layers."""
        return [(m.weight, m.bias) for m in self.critic_linears]

    def actor_fisher_product(self, obs: Tensor) -> Callable[[Tensor], Tensor] | None:
        """``v ↦ F v``, the Fisher of the mean KL over preprocessed ``obs`` at the current actor,
        by hand; None unless the actor is a plain tanh or ReLU MLP on flat features with a
        Gaussian or categorical head (the caller then takes autograd's double backward).

        The Fisher is the Gauss-Newton form ``F = (1/n) Σ_s J_sᵀ M_s J_s`` of the KL's Hessian
        at θ_old, where the KL's gradient is zero: ``J_s`` is the actor output's Jacobian and
        ``M_s`` the KL's Hessian in the output, ``diag(e^{−2 log σ})`` for a Gaussian's mean (and
        ``2`` per action dimension for the state-independent ``log_std``, which joins no other
        parameter), ``diag(p) − ppᵀ`` for logits. One product is one :func:`mlp_jvp` and one
        :func:`mlp_backward` on a forward cached here, where autograd re-walks a graph of the
        graph; the layout of ``v`` is that of :meth:`actor_parameters`. Tested equal to
        :func:`trpo_lab.optim.fisher_vector_product` of :meth:`dist_params`' KL.
        """
        gaussian = isinstance(self.distribution, DiagGaussian)
        if (
            not isinstance(obs, Tensor)
            or not self.flat_features
            or self.pi_features_extractor is not None
            or not (gaussian or isinstance(self.distribution, Categorical))
        ):
            return None
        layers, activations = self.actor_layers(), self.actor_activations
        forward = mlp_forward_cached(layers, activations, obs)
        if forward is None:
            return None
        output, cache = forward
        count = output.shape[0]
        shapes = [shape for layer in layers for shape in (layer[0].shape, layer[1].shape)]
        sizes = [math.prod(shape) for shape in shapes]
        with torch.no_grad():
            if gaussian:
                assert self.log_std is not None
                precision = torch.exp(-2.0 * self.log_std.detach()).div_(count)
                sizes.append(self.log_std.numel())
            else:
                probs = torch.softmax(output, dim=-1)

        def product(vector: Tensor) -> Tensor:
            with torch.no_grad():
                parts = [part.view(shape) for part, shape in zip(torch.split(vector, sizes), shapes, strict=False)]
                change = mlp_jvp(layers, activations, cache, list(zip(parts[::2], parts[1::2], strict=True)))
                if gaussian:
                    metric = change.mul_(precision)
                else:
                    mixed = (probs * change).sum(-1, keepdim=True)
                    metric = change.sub_(mixed).mul_(probs).div_(count)
                grads = [g.reshape(-1) for g in mlp_backward(layers, activations, cache, metric)]
                if gaussian:
                    grads.append(vector[-sizes[-1] :] * 2.0)
                return torch.cat(grads)

        return product

    # ------------------------------------------------------------------ the reference forward
    def preprocess(self, obs: Any) -> Any:
        """Network inputs of raw observations: flat features (see :mod:`trpo_lab.nn.extractors`),
        or the raw tensors for image and Dict spaces, which the extractors read inside the networks."""
        if self.flat_features:
            features: Tensor = self.features_extractor(obs)
            return features
        return obs

    def _actor_features(self, obs: Any) -> Tensor:
        if self.pi_features_extractor is not None:
            features: Tensor = self.pi_features_extractor(obs)
            return features
        shared: Tensor = obs if self.flat_features else self.features_extractor(obs)
        return shared

    def _critic_features(self, obs: Any) -> Tensor:
        if self.vf_features_extractor is not None:
            features: Tensor = self.vf_features_extractor(obs)
            return features
        shared: Tensor = obs if self.flat_features else self.features_extractor(obs)
        return shared

    def head(self, actor_out: Tensor, log_std: Tensor | None) -> Tensor:
        """Distribution parameters from the actor's output: ``[mean, log_std]`` for Gaussians."""
        if log_std is None:
            return actor_out
        return torch.cat([actor_out, log_std.expand_as(actor_out)], dim=-1)

    def dist_params(self, obs: Any) -> Tensor:
        """Distribution parameters ``(batch, param_dim)`` for preprocessed ``obs``."""
        return self.head(mlp_forward(self.actor_layers(), self.actor_activations, self._actor_features(obs)), self.log_std)

    def value(self, obs: Any) -> Tensor:
        """State values ``(batch,)`` for preprocessed ``obs``."""
        return mlp_forward(self.critic_layers(), self.critic_activations, self._critic_features(obs)).squeeze(-1)

    def dist_params_and_value(self, obs: Any) -> tuple[Tensor, Tensor]:
        """:meth:`dist_params` and :meth:`value` of preprocessed ``obs`` (a shared trunk runs once)."""
        if not self.share_features_extractor:
            return self.dist_params(obs), self.value(obs)
        features = self.features_extractor(obs)
        params = self.head(mlp_forward(self.actor_layers(), self.actor_activations, features), self.log_std)
        return params, mlp_forward(self.critic_layers(), self.critic_activations, features).squeeze(-1)

    def dist_params_and_value_by_hand(
        self, obs: Any
    ) -> tuple[Tensor, Tensor, Callable[[Tensor, Tensor], list[tuple[Tensor, Tensor]]]] | None:
        """:meth:`dist_params_and_value` without a graph, and its backward written out; None
        unless both networks are plain tanh or ReLU MLPs on flat features (the caller then
        takes autograd).

        Returns ``(params, values, backward)``: ``backward(grad_params, grad_values)`` maps the
        gradients of a loss with respect to ``params`` ``(batch, param_dim)`` and ``values``
        ``(batch,)`` to the loss's gradient for every parameter, as ``(parameter, gradient)``
        pairs: :func:`mlp_backward` through each network, and for a Gaussian the ``log_std``
        columns of ``grad_params`` summed over the batch. PPO's minibatch steps take this path,
        where autograd's graph and engine cost more than a small MLP's arithmetic. Tested
        equal to autograd's gradient of the same loss.
        """
        if not isinstance(obs, Tensor) or not self.flat_features:  # (flat features: no extractor to share)
            return None
        actor_layers, critic_layers = self.actor_layers(), self.critic_layers()
        actor = mlp_forward_cached(actor_layers, self.actor_activations, obs)
        critic = mlp_forward_cached(critic_layers, self.critic_activations, obs)
        if actor is None or critic is None:
            return None
        (actor_out, actor_cache), (critic_out, critic_cache) = actor, critic
        log_std = self.log_std
        params = self.head(actor_out, None if log_std is None else log_std.detach())
        n_out = actor_out.shape[-1]
        weights = [p for layer in actor_layers for p in layer]
        critic_weights = [p for layer in critic_layers for p in layer]

        def backward(grad_params: Tensor, grad_values: Tensor) -> list[tuple[Tensor, Tensor]]:
            grads = mlp_backward(actor_layers, self.actor_activations, actor_cache, grad_params[:, :n_out])
            pairs = list(zip(weights, grads, strict=True))
            if log_std is not None:
                pairs.append((log_std, grad_params[:, n_out:].sum(0)))
            critic_grads = mlp_backward(critic_layers, self.critic_activations, critic_cache, grad_values.unsqueeze(-1))
            return pairs + list(zip(critic_weights, critic_grads, strict=True))

        return params, critic_out.squeeze(-1), backward

    def dist_params_from_flat(self, flat_actor: Tensor, obs: Any) -> Tensor:
        """:meth:`dist_params` with the actor's parameters replaced by a flat vector.

        ``flat_actor`` is laid out like ``parameters_to_vector(actor_parameters())``. This is
        a pure function of its inputs (the actor's extractor runs through
        ``torch.func.functional_call``), so it can be vmapped over many candidate vectors, as
        the batched line search does. A shared trunk is held fixed.
        """
        tensors: list[Tensor] = []
        offset = 0
        for shape in self.actor_shapes():
            numel = math.prod(shape)
            tensors.append(flat_actor[offset : offset + numel].view(shape))
            offset += numel
        n_extractor = len(self._pi_extractor_names)
        if self.pi_features_extractor is not None:
            weights = dict(zip(self._pi_extractor_names, tensors[:n_extractor], strict=True))
            x = torch.func.functional_call(self.pi_features_extractor, weights, (obs,))
        else:
            x = self._actor_features(obs)
        n_layer_tensors = 2 * len(self.actor_linears)
        layers = [(tensors[i], tensors[i + 1]) for i in range(n_extractor, n_extractor + n_layer_tensors, 2)]
        log_std = tensors[-1] if self.log_std is not None else None
        return self.head(mlp_forward(layers, self.actor_activations, x), log_std)

    def traced_forward(self, obs: Any) -> tuple[Tensor, Tensor, list[tuple[nn.Module, Tensor, Tensor]]]:
        """:meth:`dist_params` and :meth:`value` of preprocessed ``obs``, the same computation,
        plus ``(layer, input, output)`` of every ``nn.Linear`` and ``nn.Conv2d`` (extractors'
        first, then the actor's and critic's MLP layers): what K-FAC needs to record its
        statistics. The MLPs are traced by :func:`mlp_forward`, the extractors (any module)
        by forward hooks that live only for this call."""
        extractor_trace: list[tuple[nn.Module, Tensor, Tensor]] = []

        def record(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            extractor_trace.append((module, inputs[0], output))

        handles = [
            module.register_forward_hook(record)
            for extractor in (self.features_extractor, self.pi_features_extractor, self.vf_features_extractor)
            if extractor is not None and not self.flat_features
            for module in extractor.modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))
        ]
        try:
            if self.share_features_extractor:
                actor_in = critic_in = self.features_extractor(obs)
            else:
                actor_in, critic_in = self._actor_features(obs), self._critic_features(obs)
        finally:
            for handle in handles:
                handle.remove()
        actor_trace: list[tuple[Tensor, Tensor]] = []
        critic_trace: list[tuple[Tensor, Tensor]] = []
        params = self.head(mlp_forward(self.actor_layers(), self.actor_activations, actor_in, actor_trace), self.log_std)
        values = mlp_forward(self.critic_layers(), self.critic_activations, critic_in, critic_trace).squeeze(-1)
        linears = [*self.actor_linears, *self.critic_linears]
        trace: list[tuple[nn.Module, Tensor, Tensor]] = [
            (layer, x, y) for layer, (x, y) in zip(linears, [*actor_trace, *critic_trace], strict=True)
        ]
        return params, values, [*extractor_trace, *trace]

    def act(
        self, obs: Tensor, generator: torch.Generator | None = None, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Actions for raw observations, with noise from ``generator``; ``(actions, log_probs, values)``.

        The rollout acts through :meth:`rollout_actor` instead, the same computation.
        """
        params, values = self.dist_params_and_value(self.preprocess(obs))
        dist = self.distribution
        if deterministic:
            actions = dist.mode(params)
            return actions, dist.log_prob(params, actions), values
        actions, log_probs = dist.sample_with_log_prob(params, generator)
        return actions, log_probs, values

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """``(dist_params, values)`` of raw observations."""
        return self.dist_params_and_value(self.preprocess(obs))

    # ------------------------------------------------------------------ acting
    def rollout_actor(self, noise: NoiseStream, backend: str = "auto") -> RolloutActor:
        """The rollout's acting path, built from the current weights: build another after an
        update (see :func:`trpo_lab.nn.acting.make_actor`)."""
        from trpo_lab.nn.acting import make_actor

        return make_actor(self, noise, backend)


def _functional(module: nn.Module) -> Activation:
    """The function an activation module computes (the module itself unless it is a built-in)."""
    return _FUNCTIONAL.get(type(module), module)
