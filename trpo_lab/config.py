"""Typed, validated hyperparameter configs and TOML presets.

Every agent's hyperparameters are a keyword-only dataclass that validates itself
in ``__post_init__`` and raises ``ValueError`` naming the field, the bad value and
what is allowed.  The Python constructors, the CLI's ``--set`` and the TOML presets
in the top-level ``agents/`` folder all go through :meth:`AgentConfig.from_dict`.

Names follow Stable-Baselines3 / sb3-contrib wherever the concept exists.
"""

from __future__ import annotations

import difflib
import math
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

from trpo_lab.schedules import Schedule, parse_schedule, with_initial
from trpo_lab.validation import check_int, invalid, is_int, is_number

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "AgentConfig",
    "TrustRegionConfig",
    "TRPOConfig",
    "NPGConfig",
    "PPOConfig",
    "ACKTRConfig",
    "CONFIGS",
    "Schedule",
    "config_class",
    "merge_hyperparameters",
    "check_resume_overrides",
    "parse_set_option",
    "load_toml",
]

Check = Callable[[Any], bool]
C = TypeVar("C", bound="AgentConfig")


def _param(default: Any, check: Check | None = None, allowed: str = "", doc: str = "") -> Any:
    """A dataclass field with a range check used by ``AgentConfig.__post_init__``."""
    kwargs: dict[str, Any] = {"metadata": {"check": check, "allowed": allowed, "doc": doc}}
    if isinstance(default, (dict, list)):
        kwargs["default_factory"] = lambda: type(default)(default)
    else:
        kwargs["default"] = default
    return field(**kwargs)


def _positive(v: Any) -> bool:
    return bool(v > 0)


def _non_negative(v: Any) -> bool:
    return bool(v >= 0)


def _unit_open_closed(v: Any) -> bool:
    return bool(0 < v <= 1)


def _unit_closed(v: Any) -> bool:
    return bool(0 <= v <= 1)


def _unit_open(v: Any) -> bool:
    return bool(0 < v < 1)


def _memory_size(v: Any) -> int | None:
    from trpo_lab.resources import parse_memory

    try:
        return parse_memory(v)
    except ValueError:
        return None


def _type_error(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"Invalid {name}: {value!r} ({type(value).__name__}); expected {expected}")


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """Check (and for floats, widen) a value against its field annotation."""
    optional = annotation.endswith("| None")
    base = annotation.removesuffix("| None").strip()
    if optional and isinstance(value, str) and value.strip().lower() == "none" and base != "str":
        value = None  # TOML has no null: "none" (a preset, --set key=none) switches an optional field off
    if value is None:
        if optional:
            return None
        raise _type_error(name, value, f"a value of type {base}")
    if base == "bool":
        if not isinstance(value, bool):
            raise _type_error(name, value, "true or false")
        return value
    if base == "int":
        if not is_int(value):
            raise _type_error(name, value, "an integer")
        return int(value)
    if base == "float":
        if not is_number(value, finite=False):
            raise _type_error(name, value, "a number")
        value = float(value)
        if not math.isfinite(value):
            raise _type_error(name, value, "a finite number")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise _type_error(name, value, "a string")
        return value
    if base.startswith("dict"):
        if not isinstance(value, Mapping):
            raise _type_error(name, value, "a table / dict")
        return dict(value)
    return value


@dataclass(kw_only=True, frozen=True)
class AgentConfig:
    """Hyperparameters shared by every on-policy agent.

    Configs are frozen: change one with :meth:`replace`, which returns a validated copy.
    """

    algo: ClassVar[str] = ""
    fixed_on_resume: ClassVar[dict[str, str]] = {
        "policy_kwargs": "the checkpoint's networks have this shape",
        "normalize_obs": "the environments' wrappers and statistics are saved with the run",
        "normalize_reward": "the environments' wrappers and statistics are saved with the run",
    }
    """Fields a resumed run cannot change (``train --resume --set``), each with the reason."""
    speed_only: ClassVar[frozenset[str]] = frozenset()
    """Fields that change how fast a run goes, not what it computes (``compile``): a rerun of
    an experiment does not count them as other settings, so turning one on keeps its finished runs."""

    n_steps: int = _param(2048, _positive, ">= 1", "steps per environment per update")
    batch_size: int = _param(64, _positive, ">= 1", "minibatch size")
    gamma: float = _param(0.99, _unit_open_closed, "in (0, 1]", "discount factor")
    gae_lambda: float = _param(0.95, _unit_closed, "in [0, 1]", "GAE lambda")
    learning_rate: float | Schedule = _param(3e-4, _positive, "> 0", "learning rate (or a schedule)")
    normalize_advantage: bool = _param(True, doc="standardise advantages per batch")
    ent_coef: float | Schedule = _param(0.0, _non_negative, ">= 0", "entropy bonus coefficient (or a schedule)")
    max_grad_norm: float = _param(0.5, _positive, "> 0", "gradient norm clip")
    normalize_obs: bool = _param(False, doc="running observation normalization (Gymnasium wrapper)")
    normalize_reward: bool = _param(False, doc="reward scaling by the return std (Gymnasium wrapper)")
    policy_kwargs: dict[str, Any] = _param({}, doc="net_arch, activation_fn, log_std_init, ortho_init")
    checkpoint_every: int = _param(10, _non_negative, ">= 0 (0 disables)", "updates between checkpoints")
    nan_policy: str = _param(
        "raise", lambda v: v in ("raise", "skip"), "'raise' or 'skip'", "what to do with non-finite env output"
    )
    sync_free: bool | None = _param(
        None,
        doc="the device-resident update (no host synchronisation until the metrics are read); "
        "None: on for CUDA devices, off on the CPU",
    )
    max_memory: int | str | None = _param(
        None, lambda v: _memory_size(v) is not None, "a positive number of bytes or a size such as '8GB' or '512MiB'",
        "memory the agent may use, checked before allocating (default: what the device has available)",
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            name = f.name
            check = f.metadata.get("check")
            if str(f.type) == _SCHEDULE_TYPE:
                value = parse_schedule(name, getattr(self, name), initial=cast(float, f.default))
                _check_schedule(name, value, check, f.metadata["allowed"])
            else:
                value = _coerce(name, str(f.type), getattr(self, name))
                if check is not None and value is not None and not check(value):
                    raise invalid(name, value, f.metadata["allowed"])
            object.__setattr__(self, name, value)  # frozen: the coerced value replaces the given one
        from trpo_lab.nn.policy import validate_policy_kwargs  # torch only once a config is built

        validate_policy_kwargs(self.policy_kwargs)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def scheduled_fields(cls) -> list[str]:
        """The fields that take a schedule (``learning_rate``, ``ent_coef``, PPO's ``clip_range``)."""
        return [f.name for f in fields(cls) if str(f.type) == _SCHEDULE_TYPE]

    def scheduled_values(self, progress_remaining: float) -> dict[str, float]:
        """Every scheduled field's value at ``progress_remaining`` (numbers are constant).

        Raises:
            ValueError: a callable schedule returned a non-finite value or one outside the
                field's range (naming the field and the progress).
        """
        values: dict[str, float] = {}
        for f in fields(self):
            if str(f.type) != _SCHEDULE_TYPE:
                continue
            schedule = getattr(self, f.name)
            value = schedule(progress_remaining) if isinstance(schedule, Schedule) else float(schedule)
            if not math.isfinite(value) or not _schedule_value_ok(value, f.metadata.get("check")):
                raise ValueError(
                    f"Invalid {f.name}: the schedule gave {value!r} at progress_remaining={progress_remaining:.6g}; "
                    f"expected {f.metadata['allowed']} (or 0 at the end of a decay)"
                )
            values[f.name] = value
        return values

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """Build from a mapping, rejecting unknown keys with close suggestions."""
        names = cls.field_names()
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
                raise ValueError(f"Unknown hyperparameter {key!r} for {cls.algo or cls.__name__}{hint}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (TOML-serialisable): activation classes become their names, schedules
        their ``"linear:<initial>:<final>"`` strings.

        Raises:
            ValueError: a callable schedule, which no file can hold (the message says what to write).
        """
        data = asdict(self)
        for name in self.scheduled_fields():
            value = getattr(self, name)
            if isinstance(value, Schedule):
                data[name] = value.to_string(name)
        act = data["policy_kwargs"].get("activation_fn")
        if isinstance(act, type):
            from trpo_lab.nn.policy import ACTIVATIONS

            names = [name for name, cls in ACTIVATIONS.items() if cls is act]
            data["policy_kwargs"]["activation_fn"] = names[0] if names else act.__name__
        return data

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with ``changes`` applied (configs are frozen; callable schedules are kept)."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self).from_dict(merge_hyperparameters(current, changes))


_SCHEDULE_TYPE = "float | Schedule"


def _schedule_value_ok(value: float, check: Check | None) -> bool:
    """The field's range check; a decay may also end at (or, evaluated along the way, reach) 0."""
    return check is None or check(value) or value == 0.0


def _check_schedule(name: str, value: float | Schedule, check: Check | None, allowed: str) -> None:
    """A scheduled field: a number in range, or a schedule that starts in range and ends in range or at 0."""
    if isinstance(value, Schedule):
        if check is not None and not check(value.initial):
            raise ValueError(f"Invalid {name}: the schedule starts at {value.initial!r}; expected {allowed}")
        if not _schedule_value_ok(value.final, check):
            raise ValueError(f"Invalid {name}: the schedule ends at {value.final!r}; expected {allowed} or 0")
    elif check is not None and not check(value):
        raise invalid(name, value, allowed)


def merge_hyperparameters(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` layered on top: the one merge of presets, ``--set`` and specs.

    ``policy_kwargs`` tables merge key by key; a ``"linear"`` / ``"linear:<final>"`` schedule
    string starts from the number it replaces (:func:`trpo_lab.schedules.with_initial`).
    """
    merged = dict(base)
    for key, value in overrides.items():
        if key == "policy_kwargs" and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = with_initial(value, merged.get(key))
    return merged


CURVATURES = ("cg", "kfac", "shampoo", "exact")
CRITIC_OPTIMIZERS = ("adam", "lbfgs")
DIAGNOSTICS = {"exact_every": "an integer >= 0 (0: off)"}


def _one_of(choices: tuple[str, ...]) -> Check:
    return lambda v: v in choices


def _allowed(choices: tuple[str, ...]) -> str:
    return "one of " + ", ".join(repr(c) for c in choices)


@dataclass(kw_only=True, frozen=True)
class TrustRegionConfig(AgentConfig):
    """The KL-scaled natural step of TRPO and NPG, its curvature backend and the critic fit.

    ``curvature`` picks where the step direction s ≈ F⁻¹g comes from (see
    :mod:`trpo_lab.agents.curvature`); whatever the backend, s is scaled to the KL radius with
    sᵀFs from a Fisher-vector product. ``critic_optimizer`` picks minibatch Adam
    (``n_critic_updates`` epochs of ``batch_size`` minibatches at ``learning_rate``) or
    full-batch L-BFGS (one solve of ``critic_lbfgs_max_iter`` iterations per update, as the
    original TRPO paper; with ``sync_free`` the fixed-budget, device-resident
    :func:`~trpo_lab.optim.lbfgs.lbfgs_fixed` instead of ``torch.optim.LBFGS``).
    ``diagnostics`` holds optional, costly checks; the CLI sets them with
    ``--set diagnostics.exact_every=N``.
    """

    fixed_on_resume: ClassVar[dict[str, str]] = {
        **AgentConfig.fixed_on_resume,
        "curvature": "the checkpoint holds this curvature backend's state",
        "critic_optimizer": "the checkpoint holds this critic optimizer's state",
        "critic_lbfgs_max_iter": "the checkpoint's L-BFGS state restores it",
    }

    learning_rate: float | Schedule = _param(1e-3, _positive, "> 0", "critic learning rate (Adam; or a schedule)")
    batch_size: int = _param(128, _positive, ">= 1", "critic minibatch size (Adam)")
    target_kl: float = _param(0.01, _positive, "> 0", "KL radius delta of the trust region")
    curvature: str = _param(
        "cg", _one_of(CURVATURES), _allowed(CURVATURES), "where the step direction s ~ F^-1 g comes from"
    )
    cg_max_steps: int = _param(15, _positive, ">= 1", "conjugate-gradient iterations")
    cg_damping: float = _param(0.1, _non_negative, ">= 0", "damping added to the Fisher (every curvature backend)")
    cg_tol: float = _param(1e-10, _non_negative, ">= 0", "CG tolerance on the squared residual")
    critic_optimizer: str = _param(
        "adam", _one_of(CRITIC_OPTIMIZERS), _allowed(CRITIC_OPTIMIZERS), "minibatch Adam or full-batch L-BFGS"
    )
    n_critic_updates: int = _param(10, _positive, ">= 1", "critic epochs per update (Adam)")
    critic_lbfgs_max_iter: int = _param(
        25, _positive, ">= 1", "L-BFGS iterations per critic fit (critic_optimizer = 'lbfgs')"
    )
    sub_sampling_factor: int = _param(1, _positive, ">= 1", "use every k-th sample for the FVP")
    fvp_backend: str = _param(
        "autograd", lambda v: v in ("autograd", "func"), "'autograd' or 'func'",
        "how Fisher-vector products are formed ('autograd': by hand for a plain MLP actor)",
    )
    diagnostics: dict[str, Any] = _param({}, doc="optional checks: exact_every (log train/exact_cosine every N updates)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, value in self.diagnostics.items():
            if key not in DIAGNOSTICS:
                raise ValueError(
                    f"Invalid diagnostics key {key!r} (value {value!r}); expected one of {sorted(DIAGNOSTICS)}"
                )
        check_int("diagnostics.exact_every", self.diagnostics.get("exact_every", 0), minimum=0,
                  expected=DIAGNOSTICS["exact_every"])

    @property
    def exact_every(self) -> int:
        """Updates between ``train/exact_cosine`` diagnostics (``diagnostics.exact_every``; 0: off)."""
        every: int = self.diagnostics.get("exact_every", 0)
        return every


@dataclass(kw_only=True, frozen=True)
class TRPOConfig(TrustRegionConfig):
    """TRPO (Schulman et al., 2015): natural step scaled to the KL radius, then a line search."""

    algo: ClassVar[str] = "trpo"

    line_search_shrinking_factor: float = _param(0.8, _unit_open, "in (0, 1)", "backtracking factor")
    line_search_max_iter: int = _param(10, _positive, ">= 1", "backtracking steps")
    line_search_accept_ratio: float = _param(
        0.0, _non_negative, ">= 0", "required fraction of the expected improvement (0: any improvement)"
    )
    line_search_batched: bool = _param(False, doc="evaluate all step sizes in one vmapped pass (GPU)")

    @property
    def line_search_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~trpo_lab.optim.trust_region.trust_region_line_search`."""
        return {
            "kl_limit": self.target_kl,
            "shrinking_factor": self.line_search_shrinking_factor,
            "max_iter": self.line_search_max_iter,
            "accept_ratio": self.line_search_accept_ratio,
            "batched": self.line_search_batched,
        }


@dataclass(kw_only=True, frozen=True)
class NPGConfig(TrustRegionConfig):
    """Natural policy gradient (Kakade, 2001): the TRPO step with a fixed KL radius, no line search.

    ``target_kl`` is the radius δ the full step is scaled to (β = sqrt(2δ / sᵀFs)); the KL
    actually reached is only approximately δ, since nothing backtracks.
    """

    algo: ClassVar[str] = "npg"


def _kl_batch_size() -> Any:
    """PPO's and ACKTR's ``kl_batch_size`` (one field per class: dataclass fields are not shared)."""
    return _param(
        None, _positive, ">= 1 or none",
        "samples the post-update KL and entropy are measured on: a random subset of the rollout, drawn "
        "each update (None: the whole rollout)",
    )


PPO_OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "shampoo")


def _optimizer_name(v: Any) -> bool:
    return v.lower() in PPO_OPTIMIZERS or ("." in v and not v.startswith(".") and not v.endswith("."))


@dataclass(kw_only=True, frozen=True)
class PPOConfig(AgentConfig):
    """PPO (Schulman et al., 2017): clipped surrogate, minibatch epochs, one optimizer for actor and critic."""

    algo: ClassVar[str] = "ppo"
    fixed_on_resume: ClassVar[dict[str, str]] = {
        **AgentConfig.fixed_on_resume,
        "optimizer": "the checkpoint holds this optimizer's state",
        "optimizer_kwargs": "the checkpoint's optimizer state restores them",
    }
    speed_only: ClassVar[frozenset[str]] = frozenset({"compile"})

    n_epochs: int = _param(10, _positive, ">= 1", "epochs over the rollout")
    clip_range: float | Schedule = _param(0.2, _positive, "> 0", "surrogate clip epsilon (or a schedule)")
    clip_range_vf: float | None = _param(
        None, _positive, "> 0 or none", "clip V - V_old to +-clip_range_vf, as SB3 (None: off)"
    )
    vf_coef: float = _param(0.5, _non_negative, ">= 0", "value loss coefficient")
    target_kl: float | None = _param(
        None, _positive, "> 0 or none", "stop the epochs once the approx KL exceeds 1.5 * target_kl (None: off)"
    )
    kl_batch_size: int | None = _kl_batch_size()
    compile: bool = _param(
        False,
        doc="torch.compile each minibatch's loss and gradient (compiled once, at the first update: about 15 s on "
        "a CPU, with a C++ compiler; Triton on CUDA; falls back to eager with a warning where compiling fails)",
    )
    optimizer: str = _param(
        "adam",
        _optimizer_name,
        f"one of {', '.join(PPO_OPTIMIZERS)} or a dotted torch.optim.Optimizer class path",
        "torch optimizer: adam, adamw, sgd, rmsprop, shampoo or a dotted class path",
    )
    optimizer_kwargs: dict[str, Any] = _param({}, doc="extra optimizer keyword arguments (lr is learning_rate)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if "lr" in self.optimizer_kwargs:
            raise ValueError("Invalid optimizer_kwargs: 'lr'; set learning_rate instead")


@dataclass(kw_only=True, frozen=True)
class ACKTRConfig(AgentConfig):
    """ACKTR (Wu et al., 2017): K-FAC natural gradient for actor and critic, KL-clipped.

    One K-FAC step per rollout on the whole batch (``batch_size`` is unused). ``kl_clip``
    and ``vf_kl_clip`` are the trust regions of the actor's and the critic's K-FAC
    (``η² ν² gᵀ F̂⁻¹ g ≤ kl_clip``, twice the predicted KL; for the critic about
    ``4 E[(ΔV)²]``); ``learning_rate`` η and the other K-FAC settings are shared by both.
    Defaults are the ACKTR paper's, except ``vf_kl_clip`` and ``ent_coef = 0`` (tuned on
    CartPole-v1 and Pendulum-v1). ``target_kl`` turns on the adaptive step size of the
    continuous-control ACKTR (OpenAI baselines' ``acktr_cont``, desired KL 0.002): the actor's
    learning rate follows the KL measured after each update, and ``kl_clip`` becomes a safety
    cap. See :mod:`trpo_lab.agents.acktr`.
    """

    algo: ClassVar[str] = "acktr"
    fixed_on_resume: ClassVar[dict[str, str]] = {
        **AgentConfig.fixed_on_resume,
        **{key: "the checkpoint's K-FAC state restores it" for key in (
            "kl_clip", "vf_kl_clip", "damping", "momentum", "stat_decay", "inverse_every", "eigen_tolerance")},
    }

    n_steps: int = _param(20, _positive, ">= 1", "steps per environment per update")
    learning_rate: float | Schedule = _param(
        0.25, _positive, "> 0", "K-FAC learning rate (actor and critic; or a schedule, e.g. 'linear')"
    )
    gae_lambda: float = _param(1.0, _unit_closed, "in [0, 1]", "GAE lambda (1: n-step returns)")
    ent_coef: float | Schedule = _param(0.0, _non_negative, ">= 0", "entropy bonus coefficient (or a schedule)")
    vf_coef: float = _param(0.5, _non_negative, ">= 0", "value loss coefficient")
    kl_clip: float = _param(1e-3, _positive, "> 0", "actor K-FAC trust region (2x the predicted KL)")
    vf_kl_clip: float | None = _param(
        0.1, _positive, "> 0 or none", "critic K-FAC trust region, about 4 E[dV^2] (None: off)"
    )
    damping: float = _param(1e-2, _positive, "> 0", "K-FAC damping")
    momentum: float = _param(0.9, lambda v: 0 <= v < 1, "in [0, 1)", "K-FAC momentum")
    stat_decay: float = _param(0.99, _unit_open, "in (0, 1)", "running-average decay of the factors")
    inverse_every: int = _param(
        10, _positive, ">= 1", "Fisher passes between eigendecompositions (updates, with stats_every = 1)"
    )
    eigen_tolerance: float = _param(
        0.0, lambda v: 0 <= v < 1, "in [0, 1)",
        "K-FAC: skip eigenvector pairs of curvature <= eigen_tolerance * damping, at a relative error "
        "<= eigen_tolerance in the direction (0: exact; ignored by the sync-free GPU path)",
    )
    stats_every: int = _param(
        1, _positive, ">= 1", "updates between Fisher passes (K-FAC statistics); the others reuse the factors"
    )
    stats_batch_size: int | None = _param(
        None, _positive, ">= 1 or none",
        "samples of a Fisher pass: a random subset of the rollout, in a forward of its own (None: the whole rollout)",
    )
    kl_batch_size: int | None = _kl_batch_size()
    normalize_advantage: bool = _param(False, doc="standardise advantages per batch")
    target_kl: float | None = _param(
        None,
        _positive,
        "> 0 or none",
        "adaptive actor step size: divide it by 1.5 when the measured KL exceeds 2 * target_kl, "
        "multiply it by 1.5 below target_kl / 2 (None: off)",
    )

    @classmethod
    def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
        """:meth:`AgentConfig.from_dict`, reading the retired ``lr_schedule`` key of older presets and checkpoints.

        ``lr_schedule = "linear"`` becomes ``learning_rate = "linear"`` (from the given
        ``learning_rate`` to 0) and ``"constant"`` is dropped, with a ``FutureWarning`` that
        says what to write instead.
        """
        values = dict(values)
        if "lr_schedule" in values:
            legacy = values.pop("lr_schedule")
            if legacy not in ("constant", "linear"):
                raise ValueError(
                    f"Invalid lr_schedule: {legacy!r}; lr_schedule is retired, write learning_rate = 'linear' "
                    "(or a number, 'linear:<final>', 'linear:<initial>:<final>') instead"
                )
            replacement = "learning_rate = 'linear'" if legacy == "linear" else "nothing (constant is the default)"
            warnings.warn(
                f"lr_schedule = {legacy!r} is retired; write {replacement} instead", FutureWarning, stacklevel=3
            )
            if legacy == "linear":
                start = values.get("learning_rate", cls.__dataclass_fields__["learning_rate"].default)
                values["learning_rate"] = with_initial("linear", start) if is_number(start) else start
        return super().from_dict(values)


CONFIGS: dict[str, type[AgentConfig]] = {
    "trpo": TRPOConfig,
    "npg": NPGConfig,
    "ppo": PPOConfig,
    "acktr": ACKTRConfig,
}


def config_class(algo: str) -> type[AgentConfig]:
    """The config dataclass for an algorithm name (case-insensitive)."""
    key = algo.lower()
    if key not in CONFIGS:
        raise ValueError(f"Unknown algorithm {algo!r}; expected one of {', '.join(sorted(CONFIGS))}")
    return CONFIGS[key]


RESUME_FIXED_RUN_KEYS: dict[str, str] = {
    "n_envs": "the checkpoint holds the state of this many environments",
    "seed": "the run's random streams continue from the checkpoint",
    "vectorization": "the checkpoint holds the environments' state",
    "env_kwargs": "the checkpoint holds the environments' state",
}


def check_resume_overrides(algo: str, overrides: Mapping[str, Any]) -> None:
    """Refuse ``--set`` keys a resumed run cannot change (:attr:`AgentConfig.fixed_on_resume`).

    Raises:
        ValueError: naming the first such key and why; unknown keys are left to
            :meth:`AgentConfig.from_dict` (which suggests close names).
    """
    fixed = {**RESUME_FIXED_RUN_KEYS, **config_class(algo).fixed_on_resume}
    for key in overrides:
        if key in fixed:
            raise ValueError(
                f"Invalid --set {key} on resume: {key} cannot change in a resumed run ({fixed[key]}); "
                "start a new run to change it"
            )


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as a TOML value (numbers, booleans, arrays, inline tables), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set_option(option: str, into: dict[str, Any]) -> None:
    """Apply ``key=value`` (``key`` may be dotted, e.g. ``policy_kwargs.net_arch=[32,32]``) to ``into``."""
    key, sep, value = option.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"Invalid --set {option!r}; expected key=value")
    parts = key.split(".")
    target = into
    for part in parts[:-1]:
        nested = target.setdefault(part, {})
        if not isinstance(nested, dict):
            raise ValueError(f"Invalid --set {option!r}: {part!r} is not a table")
        target = nested
    target[parts[-1]] = parse_value(value.strip())


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; errors name the file and the problem (TOML never evaluates code)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ValueError(f"TOML file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"Unreadable TOML in {path}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read TOML file {path}: {exc}") from exc
