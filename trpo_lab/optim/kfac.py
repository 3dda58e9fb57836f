"""K-FAC: Kronecker-factored approximate curvature as a ``torch.optim.Optimizer``.

References:
    J. Martens and R. Grosse, "Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature", ICML 2015 (K-FAC).
    R. Grosse and J. Martens, "A Kronecker-factored approximate Fisher matrix for
    convolution layers", ICML 2016 (KFC).
    Y. Wu, E. Mansimov, S. Liao, R. Grosse and J. Ba, "Scalable trust-region method for deep
    reinforcement learning using Kronecker-factored approximation", NeurIPS 2017 (ACKTR).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from trpo_lab.optim._flat import all_finite, any_nonfinite
from trpo_lab.optim.linalg import EigendecompositionError, deflated_symmetric_eigh, symmetric_eigh_on_device
from trpo_lab.validation import check_int, check_number, require

__all__ = ["KFAC"]

DampingMode = Literal["eigen", "factored"]
StatisticsReducer = Callable[[list[Tensor], list[float]], list[Tensor]]
"""``(batch factors [A_1, G_1, ...], their sample counts) -> reduced factors`` (see ``KFAC``)."""
_DAMPING_MODES: tuple[str, ...] = ("eigen", "factored")

_COUNTER_NAMES: tuple[str, ...] = (
    "steps",
    "eigh_retries",
    "eigh_fallbacks",
    "stats_rejected",
    "nonfinite_directions",
    "skipped_steps",
)
_REPLACED_KEYS: tuple[str, ...] = tuple(
    f"{kind}{factor}" for factor in ("A", "G") for kind in ("", "eigenvalues_", "eigenvectors_", "zero_rows_")
)
"""Per-parameter state keys whose tensors are replaced, never modified in place
(:meth:`KFAC.replaced_state_tensors`)."""
#: Counters that the device-resident path (``sync_free``) keeps as device tensors (0-d int64).
_DEVICE_COUNTER_NAMES: tuple[str, ...] = ("eigh_fallbacks", "stats_rejected", "nonfinite_directions", "skipped_steps")


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A Linear or Conv2d layer whose [W | b] gradient is K-FAC preconditioned."""

    name: str
    module: nn.Linear | nn.Conv2d
    weight_index: int
    bias_index: int | None


@dataclasses.dataclass
class _PendingStatistics:
    """Sums recorded for one layer inside one ``track_statistics()`` block."""

    input_sum: Tensor | None = None
    input_count: int = 0
    grad_sum: Tensor | None = None
    grad_count: int = 0


# --------------------------------------------------------------------------------------
# Pure numerics
# --------------------------------------------------------------------------------------


def _conv2d_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding, in the order F.pad expects, as Conv2d applies it.

    For ``padding="same"`` an odd total goes on the right/bottom, as in PyTorch's convolution.
    """
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads: list[int] = []
        for kernel, dilation in zip(
            reversed(module.kernel_size), reversed(module.dilation), strict=True
        ):
            total = dilation * (kernel - 1)
            pads += [total // 2, total - total // 2]
        return (pads[0], pads[1], pads[2], pads[3])
    pad_h, pad_w = module.padding
    return (pad_w, pad_w, pad_h, pad_h)


def _layer_input_rows(module: nn.Linear | nn.Conv2d, inputs: Tensor) -> Tensor:
    """Rows ``a`` with ``s = W a (+ b)`` for every sample and position: (rows, fan_in).

    Linear: every leading index of the input is one row. Conv2d: the im2col patches
    (padding, padding mode, stride and dilation honoured), one row per sample and output
    position, features ordered (channel, kernel row, kernel column) like ``W.reshape(out, -1)``.

    Without dilation the patches are a strided view of the input (``Tensor.unfold`` over
    height, then width), copied once into rows; ``F.unfold`` followed by the transpose to rows
    copies twice and took 2.9x as long for the Nature CNN's first layer (93 against 32 ms at 128
    frames, the same values).
    """
    if isinstance(module, nn.Conv2d):
        if inputs.dim() == 3:
            inputs = inputs.unsqueeze(0)
        padding = _conv2d_padding(module)
        if any(padding):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            inputs = F.pad(inputs, padding, mode=mode)
        (kernel_h, kernel_w), (stride_h, stride_w) = module.kernel_size, module.stride
        if module.dilation == (1, 1):
            # (batch, channels, out_h, out_w, kernel_h, kernel_w) -> one row per sample and position
            view = inputs.unfold(2, kernel_h, stride_h).unfold(3, kernel_w, stride_w)
            return view.permute(0, 2, 3, 1, 4, 5).reshape(-1, inputs.shape[1] * kernel_h * kernel_w)
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return inputs.reshape(-1, module.in_features)


def _output_grad_rows(module: nn.Linear | nn.Conv2d, grad: Tensor) -> tuple[Tensor, int]:
    """Rows of dL/ds (one per sample and position) and the batch size (leading dimension)."""
    if isinstance(module, nn.Conv2d):
        if grad.dim() == 3:
            grad = grad.unsqueeze(0)
        return grad.movedim(1, -1).reshape(-1, grad.shape[1]), grad.shape[0]
    batch_size = grad.shape[0] if grad.dim() >= 2 else 1
    return grad.reshape(-1, module.out_features), batch_size


_GRAM_BLOCK = 128
"""Column block of :func:`_gram_into`'s triangular product; factors narrower than two blocks
keep the plain product (the MLPs' factors: their values, and so every trained MLP run, stay
as they were)."""


def _gram_into(rows: Tensor, out: Tensor) -> None:
    """``out ← RᵀR`` for rows ``R`` (n, d ≥ 2·_GRAM_BLOCK) into ``out``, a (d, d) view whose
    rows may be strided (the factor with its bias row and column): no temporary of its size.

    When the product is compute-bound (``n ≥ d``: a convolution's patch rows), only the blocks
    on and above the diagonal are multiplied, one GEMM per block row of about ``_GRAM_BLOCK``
    columns, and each is mirrored below: ``(k + 1) / 2k`` of the full product's multiply-adds
    for ``k`` blocks (0.625 for the Nature CNN's conv2 and conv3).
    """
    size = rows.shape[1]
    if rows.shape[0] < size:
        torch.mm(rows.mT, rows, out=out)
        return
    blocks = round(size / _GRAM_BLOCK)
    edges = [round(i * size / blocks) for i in range(blocks + 1)]
    for start, stop in zip(edges[:-1], edges[1:], strict=True):
        torch.mm(rows[:, start:stop].mT, rows[:, start:], out=out[start:stop, start:])
        out[stop:, start:stop] = out[start:stop, stop:].mT


def _input_outer(rows: Tensor, with_bias: bool) -> Tensor:
    """``aᵀa`` summed over the rows, with ``a`` extended by a 1 for the bias when ``with_bias``.

    Built blockwise, ``[[RᵀR, Rᵀ1], [1ᵀR, n]]``, instead of appending a column of ones to the
    rows: for a convolution the rows are every patch of the batch (128,000 x 256 for the Nature
    CNN's first layer at 320 frames), and copying them cost as much as the product. Wide
    factors get ``RᵀR`` from :func:`_gram_into`, written in place."""
    size = rows.shape[1]
    if size < 2 * _GRAM_BLOCK:
        outer = rows.mT @ rows
        if not with_bias:
            return outer
        full = outer.new_empty(size + 1, size + 1)
        full[:size, :size] = outer
    else:
        full = rows.new_empty(size + 1, size + 1) if with_bias else rows.new_empty(size, size)
        _gram_into(rows, full[:size, :size])
        if not with_bias:
            return full
    sums = rows.sum(dim=0)
    full[:size, size] = sums
    full[size, :size] = sums
    full[size, size].fill_(rows.shape[0])  # a scalar fill, not a host tensor copied over
    return full


def _eigenbasis_denominator(
    eigenvalues_a: Tensor, eigenvalues_g: Tensor, damping: float, damping_mode: str
) -> Tensor:
    """The (out, fan_in) divisor applied to the gradient in the Kronecker eigenbasis.

    "eigen":    λ_G λ_A^T + damping, i.e. (A ⊗ G + damping·I)^-1 exactly (ACKTR reference).
    "factored": (λ_G + √damping / π)(λ_A + π √damping)^T, i.e. factored Tikhonov damping
                (A + π√γ I) ⊗ (G + √γ/π I) with π² = (tr A / dim A) / (tr G / dim G)
                (Martens & Grosse 2015, section 6.3); π = 1 when that ratio is not positive.
    """
    if damping_mode == "eigen":
        return torch.outer(eigenvalues_g, eigenvalues_a) + damping
    ratio = eigenvalues_a.mean() / eigenvalues_g.mean()
    usable = torch.isfinite(ratio) & (ratio > 0)
    pi = torch.where(usable, ratio, torch.ones_like(ratio)).sqrt()
    root = math.sqrt(damping)
    return torch.outer(eigenvalues_g + root / pi, eigenvalues_a + root * pi)


LiveBlock = tuple[Tensor, Tensor, Tensor]
"""``(zero_rows, live_rows, Q_live)`` of a deflated eigenbasis Q: its first columns are the unit
vectors of ``zero_rows`` (eigenvalue 0), the others are ``Q_live`` on ``live_rows`` and 0 on the
zero rows (:func:`~trpo_lab.optim.linalg.deflated_symmetric_eigh`)."""


def _times_basis(x: Tensor, vectors: Tensor, block: LiveBlock | None) -> Tensor:
    """``x @ Q``, rotating by the live block alone when Q is deflated."""
    if block is None:
        return x @ vectors
    zero_rows, live_rows, live_vectors = block
    return torch.cat([x[:, zero_rows], x[:, live_rows] @ live_vectors], dim=1)


def _times_basis_t(y: Tensor, vectors: Tensor, block: LiveBlock | None) -> Tensor:
    """``y @ Qᵀ``, rotating by the live block alone when Q is deflated."""
    if block is None:
        return y @ vectors.mT
    zero_rows, live_rows, live_vectors = block
    n_zero = zero_rows.numel()
    out = y.new_empty(y.shape[0], vectors.shape[0])
    out[:, zero_rows] = y[:, :n_zero]
    out[:, live_rows] = y[:, n_zero:] @ live_vectors.mT
    return out


def _precondition_matrix(
    grad: Tensor,
    eigenvectors_a: Tensor,
    eigenvectors_g: Tensor,
    denominator: Tensor,
    block_a: LiveBlock | None = None,
    block_g: LiveBlock | None = None,
    eigen_damping: bool = False,
) -> Tensor:
    """V = Q_G [(Q_G^T ∇W Q_A) / denominator] Q_A^T for the (out, fan_in) gradient ∇W.

    ``block_a`` / ``block_g`` (:data:`LiveBlock`) when A's / G's decomposition deflated exactly
    zero rows (inputs that never fire, outputs whose gradient is always 0): the same V is
    computed rotating by the live blocks alone. The rows of V on G's zero rows are
    ``((∇ Q_A) / denominator) Q_A^T`` of ∇'s rows there; with ``eigen_damping`` (the
    denominator λ_G λ_Aᵀ + γ, whose rows for λ_G = 0 are all γ) that is ∇ / γ, without a
    rotation. On Pong the Nature CNN's fc layer has 1150 dead inputs of 3137 and 200 dead
    outputs of 512, and its preconditioning, the largest per-update cost of K-FAC there, drops
    from 2 x 512 x 3137² to about 2 x 312 x 1987² multiply-adds.
    """
    if block_g is None:
        rotated = _times_basis(eigenvectors_g.mT @ grad, eigenvectors_a, block_a)
        return eigenvectors_g @ _times_basis_t(rotated / denominator, eigenvectors_a, block_a)
    zero_rows, live_rows, live_vectors = block_g
    n_zero = zero_rows.numel()
    out = torch.empty_like(grad)
    dead = grad[zero_rows]
    if eigen_damping:
        out[zero_rows] = dead / denominator[:n_zero]
    else:
        rotated_dead = _times_basis(dead, eigenvectors_a, block_a) / denominator[:n_zero]
        out[zero_rows] = _times_basis_t(rotated_dead, eigenvectors_a, block_a)
    rotated = _times_basis(live_vectors.mT @ grad[live_rows], eigenvectors_a, block_a)
    out[live_rows] = live_vectors @ _times_basis_t(rotated / denominator[n_zero:], eigenvectors_a, block_a)
    return out


TruncatedBasis = tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]
"""``(Q_G kept, Q_A kept, C, G's live rows, A's live rows)`` of :func:`_precondition_truncated`:
the eigenvectors whose pairs carry curvature above the tolerance, and the correction
``λ_G λ_Aᵀ / (γ (λ_G λ_Aᵀ + γ))`` on them. Where a decomposition deflated zero rows
(:data:`LiveBlock`), its kept eigenvectors are 0 there, so they are stored on the live rows
alone, with those rows' indices; ``None`` when every row is live."""


def _truncated_basis(
    eigenvalues_a: Tensor, eigenvectors_a: Tensor, eigenvalues_g: Tensor, eigenvectors_g: Tensor,
    damping: float, tolerance: float, block_a: LiveBlock | None = None, block_g: LiveBlock | None = None,
) -> TruncatedBasis:
    """The kept eigenvectors of :func:`_precondition_truncated`: A's ``j`` with
    ``λ_A,j · max λ_G > tolerance · γ`` and G's ``i`` with ``λ_G,i · max λ_A > tolerance · γ``,
    so that every pair left out has ``λ_G,i λ_A,j ≤ tolerance · γ``. The unit vectors of
    deflated zero rows have eigenvalue 0 and are never kept; every kept one is 0 on the zero
    rows, which ``block_a`` / ``block_g`` name, and is stored without them."""
    threshold = tolerance * damping
    keep_a = eigenvalues_a * eigenvalues_g.max() > threshold
    keep_g = eigenvalues_g * eigenvalues_a.max() > threshold
    curvature = torch.outer(eigenvalues_g[keep_g], eigenvalues_a[keep_a])
    correction = curvature / (damping * (curvature + damping))
    vectors_g, vectors_a = eigenvectors_g[:, keep_g], eigenvectors_a[:, keep_a]
    live_g = None if block_g is None else block_g[1]
    live_a = None if block_a is None else block_a[1]
    if live_g is not None:
        vectors_g = vectors_g[live_g]
    if live_a is not None:
        vectors_a = vectors_a[live_a]
    return vectors_g.contiguous(), vectors_a.contiguous(), correction, live_g, live_a


def _g_side_first(out: int, fan_in: int, kept_g: int, kept_a: int) -> bool:
    """Whether ``(Q_Gᵀ ∇) Q_A`` (``k_G·out·in + k_G·in·k_A`` multiply-adds) is no dearer than
    ``Q_Gᵀ (∇ Q_A)`` (``out·in·k_A + k_G·out·k_A``) for an ``(out, in)`` gradient."""
    return kept_g * fan_in * (out + kept_a) <= out * kept_a * (fan_in + kept_g)


def _precondition_truncated(grad: Tensor, basis: TruncatedBasis, damping: float) -> Tensor:
    """V ≈ (A ⊗ G + γI)⁻¹∇ with the pairs of negligible curvature left out (``damping_mode="eigen"``).

    Exactly, ``V = ∇/γ − Q_G [(Q_Gᵀ ∇ Q_A) ⊙ C] Q_Aᵀ`` with ``C = λ_G λ_Aᵀ / (γ(λ_G λ_Aᵀ + γ))``.
    Keeping only the eigenvectors of :func:`_truncated_basis` drops the pairs with
    ``λ_G λ_A ≤ τγ``; in the eigenbasis each such coordinate becomes ``r/γ`` instead of
    ``r/(λ_G λ_A + γ)``, a relative error of ``λ_G λ_A / γ ≤ τ``, so ``‖V' − V‖ ≤ τ ‖V‖``
    (the bases are orthogonal) and ``⟨V', ∇⟩`` is within a factor ``1 + τ`` of ``⟨V, ∇⟩``.
    The four basis changes run over the kept columns and the live rows only (on Pong's Nature
    CNN fc layer at ``τ = 1e-3``, 160 updates into a run: 500 of G's 512 eigenvectors on 510
    live rows, 1150 of A's 3137 on 2108), each side in the order with fewer multiply-adds
    (:func:`_g_side_first`). Which order is cheaper changes during a run, as G goes from
    keeping a third of its eigenvectors to keeping nearly all; the wrong one takes about
    twice as long on that layer.
    """
    vectors_g, vectors_a, correction, live_g, live_a = basis
    live = grad if live_g is None else grad.index_select(0, live_g)
    live = live if live_a is None else live.index_select(1, live_a)
    if _g_side_first(live.shape[0], live.shape[1], vectors_g.shape[1], vectors_a.shape[1]):
        rotated = (vectors_g.mT @ live) @ vectors_a
        back = vectors_g @ ((rotated * correction) @ vectors_a.mT)
    else:
        rotated = vectors_g.mT @ (live @ vectors_a)
        back = (vectors_g @ (rotated * correction)) @ vectors_a.mT
    out = grad / damping
    if live_a is not None:  # 0 on A's zero rows: V there is ∇/γ
        back = back.new_zeros(back.shape[0], grad.shape[1]).index_copy_(1, live_a, back)
    if live_g is None:
        return out.sub_(back)
    return out.index_add_(0, live_g, back, alpha=-1.0)


def _kl_scale_on_device(vg_sum: Tensor, lr: float | Tensor, kl_clip: float | None) -> Tensor:
    """:func:`_kl_scale` as a 0-d tensor on ``vg_sum``'s device, decided with ``torch.where``."""
    one = torch.ones_like(vg_sum)
    if kl_clip is None:
        return one
    quadratic = lr * lr * vg_sum
    clipped = torch.minimum(one, (kl_clip / quadratic.clamp(min=torch.finfo(vg_sum.dtype).tiny)).sqrt())
    scale = torch.where(quadratic > 0.0, clipped, one)
    return torch.where(torch.isfinite(quadratic), scale, torch.zeros_like(vg_sum))


def _kl_scale(vg_sum: float, lr: float, kl_clip: float | None) -> float:
    """ACKTR's ν = min(1, sqrt(kl_clip / (lr² Σ⟨V, ∇⟩))).

    1 when clipping is off or the quadratic term is not positive (a zero gradient: nothing to
    clip); 0 when it is not finite (the caller skips the step).
    """
    if kl_clip is None:
        return 1.0
    quadratic = lr * lr * vg_sum
    if not math.isfinite(quadratic):
        return 0.0
    if quadratic <= 0.0:
        return 1.0
    return min(1.0, math.sqrt(kl_clip / quadratic))


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


class KFAC(torch.optim.Optimizer):
    r"""K-FAC with ACKTR's KL-clipped step, over the Linear and Conv2d layers of a module.

    For every ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) layer with ``s = W a + b``, the
    Fisher block of the combined parameter ``[W | b]`` is approximated by ``A ⊗ G``
    (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions):

    .. math::
        A = \mathbb{E}[\bar a \bar a^\top], \quad \bar a = [a; 1] \qquad
        G = \mathbb{E}_n\Big[\textstyle\sum_t g_{n,t} g_{n,t}^\top\Big],
        \quad g_{n,t} = N \, \partial L / \partial s_{n,t}

    - The bias is a column of ones appended to the input, so ``A`` is (fan_in + 1) square and
      the bias gradient is the last column of the combined ``[∇W | ∇b]`` gradient.
    - ``g`` is the gradient with respect to the layer's output (pre-activation), multiplied by
      the batch size ``N`` (the leading dimension): the Fisher loss is assumed to be a *mean*
      over the batch, so this recovers per-sample gradients and ``G`` is the expectation of
      their outer products.
    - Convolutions (KFC): ``a`` runs over the im2col patches of every output position ``t``
      (padding, padding mode, stride and dilation honoured) and ``A`` averages over samples
      *and* positions; ``G`` sums the outer products over positions and averages over
      samples, so that ``A ⊗ G = T·E[a a^T] ⊗ E[g g^T]``, the KFC approximation under
      spatially uncorrelated derivatives. Linear inputs with extra leading dimensions are
      treated the same way (positions = all but the first dimension).
    - Running averages: after the ``k``-th statistics update the factor is the bias-free
      exponential average ``Σ_j β^(k-j) X_j / Σ_j β^(k-j)`` with ``β = stat_decay``, computed
      as ``X ← X + w_k (X_k - X)``, ``w_k = (1-β) / (1-β^k)``. The first update therefore
      sets the factor to its batch value, and early batches are not over-weighted.

    With the eigendecompositions ``A = Q_A diag(λ_A) Q_A^T`` and ``G = Q_G diag(λ_G) Q_G^T``,
    recomputed once every ``inverse_every`` statistics updates, and ``∇`` the gradient plus
    ``weight_decay · θ``, the direction for a layer is (ACKTR's reference code)

    .. math::
        V = Q_G \big[(Q_G^\top \nabla_{[W|b]} Q_A)
            \oslash (\lambda_G \lambda_A^\top + \gamma)\big] Q_A^\top
          = (A \otimes G + \gamma I)^{-1} \nabla_{[W|b]}

    with ``γ = damping`` (``damping_mode="eigen"``, the default). ``damping_mode="factored"``
    uses factored Tikhonov damping ``(G + √γ/π I)^{-1} ∇ (A + π√γ I)^{-1}`` instead, with
    ``π² = (tr A / dim A) / (tr G / dim G)`` (Martens & Grosse 2015, section 6.3).

    ``eigen_tolerance = τ > 0`` (``damping_mode="eigen"``, host path) leaves out the
    eigenvector pairs whose curvature ``λ_G λ_A`` is at most ``τγ``: their coordinates are
    divided by ``γ`` instead of ``λ_G λ_A + γ``, so ``‖V' − V‖ ≤ τ‖V‖``, and the basis
    changes run over the other eigenvectors only. The factors of ReLU networks have a few
    large eigenvalues and many tiny ones: on Pong's Nature CNN, ``τ = 1e-3`` keeps 697 of the
    fc layer's 3137 input and 192 of its 512 output eigenvectors. 0 (the default) is exact.

    Every other trainable parameter (LayerNorm, embeddings, free ``nn.Parameter`` such as a
    Gaussian log-std, grouped or weight-tied layers, layers without recorded statistics)
    takes the plain gradient as its direction, ``V = ∇``.

    The step is ACKTR's trust region (Wu et al. 2017) followed by momentum:

    .. math::
        \nu = \min\Big(1, \sqrt{\kappa /
              (\eta^2 \textstyle\sum_\theta \langle V, \nabla \rangle)}\Big),
        \quad m \leftarrow \mu m + (1-\mu)\, \nu V, \quad \theta \leftarrow \theta - \eta m

    with ``η = lr``, ``κ = kl_clip`` (``None`` disables clipping: ``ν = 1``) and ``μ = momentum``.
    The sum runs over all parameters; ν = 1 when it is zero (a zero gradient) and the whole
    step is skipped (counted in ``kfac/skipped_steps``) when it is not finite. Momentum is an
    exponential average of the clipped directions, as ACKTR's reference (a TensorFlow
    momentum optimizer with learning rate ``η(1-μ)``), so a steady step is ``η ν V`` and the KL
    clip bounds it; the buffer starts at the first ``ν V`` (torch.optim.SGD's convention).

    Robustness on long runs: a statistics batch with non-finite values is rejected
    (``kfac/stats_rejected``); an eigendecomposition (:func:`trpo_lab.optim.linalg.symmetric_eigh`)
    that raises or returns non-finite values is retried in float64 (``kfac/eigh_retries``) and,
    failing that, the previous one is kept, or the identity if there is none
    (``kfac/eigh_fallbacks``); eigenvalues are clamped at 0;
    a parameter whose direction is not finite is left untouched, momentum buffer included
    (``kfac/nonfinite_directions``). NaN never reaches the parameters.

    Statistics are recorded only inside :meth:`track_statistics`, by a forward hook on each
    layer (inputs) and a tensor hook on its output (output gradients); the hooks exist only
    while the block is open, so the module can run anywhere else (``torch.inference_mode``,
    ``torch.func``, in-place activations) untouched. A tensor hook on the output, registered
    before any in-place activation modifies it, receives the gradient with respect to the
    pre-activation itself, which ``register_full_backward_hook`` would refuse.

    Example (supervised, with the true Fisher: the Fisher loss uses targets sampled from the
    model's own predictive distribution, not the labels, which would give the empirical
    Fisher; ACKTR does the same with actions sampled from the policy)::

        model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 4))
        opt = KFAC(model, lr=0.5, kl_clip=0.1, stat_decay=0.95, inverse_every=5)
        for x, y in loader:
            with opt.track_statistics():
                logits = model(x)
                sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
                F.cross_entropy(logits, sampled).backward(retain_graph=True)
            opt.zero_grad()
            F.cross_entropy(logits, y).backward()
            opt.step()

    Args:
        module: the model; its trainable parameters form the single parameter group, in
            ``module.parameters()`` order.
        lr: learning rate η (default 0.25, ACKTR).
        momentum: μ in [0, 1) (default 0.9, ACKTR).
        damping: γ ≥ 0 (default 1e-2).
        kl_clip: κ > 0, the trust-region size, or None to disable clipping (default 1e-3).
        stat_decay: β in [0, 1) for the running averages of A and G (default 0.99).
        inverse_every: statistics updates between eigendecompositions, ≥ 1 (default 10). With
            one Fisher pass per step this is "every ``inverse_every`` steps".
        weight_decay: L2 coefficient added to the gradient before preconditioning (default 0).
        damping_mode: "eigen" (default) or "factored", see above.
        eigen_tolerance: τ ≥ 0, the relative error allowed in V to skip eigenvector pairs of
            negligible curvature (see above; default 0, exact). Only with
            ``damping_mode="eigen"``; ignored with ``sync_free``, whose shapes cannot depend
            on the eigenvalues without a host synchronisation.
        statistics_reducer: optional ``(factors, counts) -> factors`` applied to each batch's
            factors ``[A_1, G_1, A_2, G_2, ...]`` (with the rows/samples each was averaged
            over) before they enter the running averages; data-parallel training passes
            :meth:`trpo_lab.distributed.DistributedContext.weighted_means` so that every rank
            folds in the factors of the whole batch over all ranks. Default None: local factors.
        sync_free: the device-resident path (default False): no host synchronisation in
            :meth:`track_statistics`, :meth:`precondition` or :meth:`step`. Every check above
            (rejected batches, non-finite eigendecompositions, non-finite directions, the skip
            of a step whose ν is not finite) is decided with ``torch.where`` on the device,
            the counters and :attr:`last_stats` stay device tensors, and ``lr`` may be a 0-d
            tensor. The eigendecompositions run in float32 only: one that is not finite keeps
            the previous eigenbasis (the identity if there is none) and counts in
            ``eigh_fallbacks``, without the float64 retry (see
            :func:`trpo_lab.optim.linalg.symmetric_eigh_on_device`; ``torch.linalg.eigh``
            itself still reads its error code on CUDA). Results equal the host path's up to
            rounding, except after a rejected statistics batch, which still advances the
            ``inverse_every`` schedule here.
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float = 0.25,
        momentum: float = 0.9,
        damping: float = 1e-2,
        kl_clip: float | None = 1e-3,
        stat_decay: float = 0.99,
        inverse_every: int = 10,
        weight_decay: float = 0.0,
        damping_mode: DampingMode = "eigen",
        statistics_reducer: StatisticsReducer | None = None,
        sync_free: bool = False,
        eigen_tolerance: float = 0.0,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Invalid module: expected an nn.Module, got {type(module).__name__}")
        check_number("lr", lr, minimum=0.0)
        check_number("momentum", momentum, minimum=0.0, expected="0 <= momentum < 1")
        require(momentum < 1.0, "momentum", momentum, "0 <= momentum < 1")
        check_number("damping", damping, minimum=0.0)
        if kl_clip is not None:
            check_number("kl_clip", kl_clip, minimum=0.0, strict=True, expected="a finite number > 0 or None")
        check_number("stat_decay", stat_decay, minimum=0.0, expected="0 <= stat_decay < 1")
        require(stat_decay < 1.0, "stat_decay", stat_decay, "0 <= stat_decay < 1")
        check_int("inverse_every", inverse_every, minimum=1)
        check_number("weight_decay", weight_decay, minimum=0.0)
        require(damping_mode in _DAMPING_MODES, "damping_mode", damping_mode, f"one of {_DAMPING_MODES}")
        require(isinstance(sync_free, bool), "sync_free", sync_free, "True or False")
        check_number("eigen_tolerance", eigen_tolerance, minimum=0.0, expected="a number in [0, 1)")
        require(eigen_tolerance < 1.0, "eigen_tolerance", eigen_tolerance, "a number in [0, 1)")
        require(
            eigen_tolerance == 0.0 or damping_mode == "eigen", "eigen_tolerance", eigen_tolerance,
            '0 with damping_mode="factored" (the truncation is derived for "eigen" damping)',
        )

        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("Invalid module: it has no trainable parameters")
        defaults: dict[str, Any] = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            kl_clip=kl_clip,
            stat_decay=stat_decay,
            inverse_every=inverse_every,
            weight_decay=weight_decay,
            damping_mode=damping_mode,
            eigen_tolerance=eigen_tolerance,
        )
        super().__init__(params, defaults)
        self._layers = _find_layers(module, params)
        self._layer_index = {id(layer.module): index for index, layer in enumerate(self._layers)}
        self._handles: list[RemovableHandle] = []
        self._pending: dict[int, _PendingStatistics] | None = None
        self._sync_free = sync_free
        self._counters: dict[str, int | Tensor] = dict.fromkeys(_COUNTER_NAMES, 0)
        if sync_free:
            for name in _DEVICE_COUNTER_NAMES:
                self._counters[name] = torch.zeros((), dtype=torch.int64, device=params[0].device)
        self._step_stats: dict[str, float | Tensor] = {}
        self._warned_missing_statistics = False
        self.statistics_reducer = statistics_reducer
        self._eigh_generation = 0  # bumped whenever an eigendecomposition may have changed
        self._live_blocks: dict[tuple[int, str], tuple[Tensor, LiveBlock]] = {}
        """(layer state's id, factor) -> the eigenvectors a live block was gathered from, and the block."""
        self._truncated: dict[int, tuple[tuple[Any, ...], TruncatedBasis]] = {}
        """layer state's id -> (the eigenvectors, damping and tolerance it was built from, the basis)."""
        self._eigen_stats: tuple[tuple[Any, ...], dict[str, float | Tensor]] | None = None

    @property
    def sync_free(self) -> bool:
        """Whether this optimizer runs device-resident (the ``sync_free`` argument, fixed at construction)."""
        return self._sync_free

    # ------------------------------------------------------------------ statistics

    @contextlib.contextmanager
    def track_statistics(self, hooks: bool = True) -> Iterator[None]:
        """Record K-FAC statistics from the forward and backward passes run inside the block.

        Both the forward and the backward of the Fisher loss must run inside; the loss must
        be a mean over the batch (leading) dimension, see the class docstring. On a normal
        exit the recorded batch is folded into the running factors of every layer that saw
        both inputs and output gradients; if the block raises, the batch is discarded.

        Args:
            hooks: Record through hooks on the layers (default). ``False`` installs none: the
                caller hands each layer's inputs and output gradients to
                :meth:`record_statistics` instead, which skips the hooks' per-call overhead
                and lets the Fisher backward stop at the layer outputs (no weight gradients).
        """
        if self._pending is not None:
            raise RuntimeError("KFAC.track_statistics() is already active; it cannot be nested")
        self._pending = {}
        if hooks:
            self._handles = [
                layer.module.register_forward_hook(self._make_forward_hook(index), with_kwargs=True)
                for index, layer in enumerate(self._layers)
            ]
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            self.remove_hooks()
        self._fold_statistics(pending)

    def record_statistics(self, module: nn.Module, inputs: Tensor, output_grads: Tensor) -> None:
        """Record one pass of a layer by hand, inside ``track_statistics(hooks=False)``.

        Args:
            module: one of this optimizer's Linear / Conv2d layers.
            inputs: what the layer was called with in the Fisher pass.
            output_grads: the gradient of the (batch-mean) Fisher loss with respect to the
                layer's output, e.g. from ``torch.autograd.grad(loss, outputs)``.

        Raises:
            RuntimeError: outside ``track_statistics()``.
            ValueError: ``module`` is not one of the layers K-FAC preconditions.
        """
        if self._pending is None:
            raise RuntimeError("KFAC.record_statistics() needs an open track_statistics(hooks=False) block")
        index = self._layer_index.get(id(module))
        if index is None:
            raise ValueError(
                f"Invalid module: {type(module).__name__} is not one of this KFAC's layers "
                f"{[layer.name for layer in self._layers]}"
            )
        self._record_inputs(index, inputs)
        self._record_output_grads(index, output_grads)

    def remove_hooks(self) -> None:
        """Remove the module hooks. They exist only inside :meth:`track_statistics`, which
        removes them on exit; calling this at any other time is a harmless no-op."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record_inputs(self, index: int, inputs: Tensor) -> None:
        pending = self._pending
        if pending is None:
            return
        layer = self._layers[index]
        weight = self._param(layer.weight_index)
        with torch.no_grad():
            rows = _layer_input_rows(layer.module, inputs.detach().to(weight.dtype))
            stats = pending.get(index)
            if stats is None:
                stats = pending[index] = _PendingStatistics()
            outer = _input_outer(rows, layer.bias_index is not None)
            # The pending sums are this pass's own tensors: added to and divided in place.
            stats.input_sum = outer if stats.input_sum is None else stats.input_sum.add_(outer)
            stats.input_count += rows.shape[0]

    def _record_output_grads(self, index: int, grad: Tensor) -> None:
        pending = self._pending
        if pending is None:
            return
        layer = self._layers[index]
        weight = self._param(layer.weight_index)
        with torch.no_grad():
            rows, batch_size = _output_grad_rows(layer.module, grad.detach().to(weight.dtype))
            # Each backward contributes N·Σ g g^T (the batch estimate of G for a mean loss,
            # see the class docstring), weighted by its batch size N.
            stats = pending.get(index)
            if stats is None:
                stats = pending[index] = _PendingStatistics()
            outer = (rows.mT @ rows).mul_(batch_size * batch_size)
            stats.grad_sum = outer if stats.grad_sum is None else stats.grad_sum.add_(outer)
            stats.grad_count += batch_size

    def _make_forward_hook(
        self, index: int
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def record_output_grad(grad: Tensor) -> None:
            self._record_output_grads(index, grad)

        def record_inputs(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if self._pending is None or not isinstance(output, Tensor) or not output.requires_grad:
                return
            self._record_inputs(index, args[0] if args else kwargs["input"])
            output.register_hook(record_output_grad)  # type: ignore[no-untyped-call]  # unannotated in torch

        return record_inputs

    def _fold_statistics(self, pending: dict[int, _PendingStatistics]) -> None:
        batches: list[tuple[_Layer, Tensor, Tensor]] = []
        for index, stats in sorted(pending.items()):
            if stats.input_sum is None or stats.grad_sum is None:
                continue
            batches.append(
                (
                    self._layers[index],
                    stats.input_sum.div_(stats.input_count),
                    stats.grad_sum.div_(stats.grad_count),
                )
            )
        if not batches:
            return
        if self.statistics_reducer is not None:
            counts = [
                float(count)
                for index, stats in sorted(pending.items())
                if stats.input_sum is not None and stats.grad_sum is not None
                for count in (stats.input_count, stats.grad_count)
            ]
            reduced = self.statistics_reducer([f for _, a, g in batches for f in (a, g)], counts)
            batches = [(layer, reduced[2 * i], reduced[2 * i + 1]) for i, (layer, _, _) in enumerate(batches)]
        stat_decay = self.param_groups[0]["stat_decay"]
        if self._sync_free:
            self._fold_on_device(batches, stat_decay)
            return
        factors = [f for _, a, g in batches for f in (a, g)]
        if all_finite(factors):  # the usual case: one fused check, one host sync
            finite = [True] * len(batches)
        else:
            finite = torch.stack(
                [torch.isfinite(a).all() & torch.isfinite(g).all() for _, a, g in batches]
            ).tolist()
        for (layer, factor_a, factor_g), is_finite in zip(batches, finite, strict=True):
            if not is_finite:
                self._counters["stats_rejected"] += 1
                continue
            state = self.state[self._param(layer.weight_index)]
            updates = state.get("stat_updates", 0) + 1
            if "A" not in state:
                state["A"], state["G"] = factor_a, factor_g
            else:
                weight = (1.0 - stat_decay) / (1.0 - stat_decay**updates)
                # Not in place (see replaced_state_tensors): the same kernel as lerp_, so the same
                # values, written over this pass's batch factor (its own tensor), not a new one.
                state["A"] = torch.lerp(state["A"], factor_a, weight, out=factor_a)
                state["G"] = torch.lerp(state["G"], factor_g, weight, out=factor_g)
            state["stat_updates"] = updates
            state["updates_since_eigh"] = state.get("updates_since_eigh", 0) + 1

    def _fold_on_device(self, batches: list[tuple[_Layer, Tensor, Tensor]], stat_decay: float) -> None:
        """The fold of ``sync_free``: the same running averages, with a non-finite batch rejected
        by ``torch.where`` (factors and their update count ``stat_updates``, a device tensor,
        stay as they were). A layer whose every batch so far was rejected has zero factors and
        ``stat_updates`` 0, and takes plain gradient steps (see :meth:`_directions`).
        ``updates_since_eigh`` counts every fold, rejected or not (a host-side schedule)."""
        for layer, factor_a, factor_g in batches:
            state = self.state[self._param(layer.weight_index)]
            finite = torch.isfinite(factor_a).all() & torch.isfinite(factor_g).all()
            if "A" not in state:
                state["A"] = torch.where(finite, factor_a, torch.zeros_like(factor_a))
                state["G"] = torch.where(finite, factor_g, torch.zeros_like(factor_g))
                state["stat_updates"] = finite.to(torch.int64)
            else:
                updates = state["stat_updates"] + finite.to(torch.int64)
                # w_k = (1-β) / (1-β^k), used only where the batch is accepted (k ≥ 1).
                weight = (1.0 - stat_decay) / (1.0 - stat_decay ** updates.clamp(min=1).to(torch.float64))
                for name, batch in (("A", factor_a), ("G", factor_g)):
                    current = state[name]
                    state[name] = torch.where(finite, current.lerp(batch, weight.to(current.dtype)), current)
                state["stat_updates"] = updates
            self._count("stats_rejected", ~finite)
            state["updates_since_eigh"] = state.get("updates_since_eigh", 0) + 1

    def _count(self, name: str, amount: Tensor) -> None:
        """Add a device amount (bool or int tensor) to a device counter (``sync_free``)."""
        counter = self._counters[name]
        assert isinstance(counter, Tensor), name  # _DEVICE_COUNTER_NAMES are tensors with sync_free
        counter.add_(amount.to(counter.dtype).sum())

    # ------------------------------------------------------------------ preconditioning

    def _param(self, index: int) -> Tensor:
        param: Tensor = self.param_groups[0]["params"][index]
        return param

    def _denominator(self, state: dict[str, Any]) -> Tensor:
        group = self.param_groups[0]
        return _eigenbasis_denominator(
            state["eigenvalues_A"], state["eigenvalues_G"], group["damping"], group["damping_mode"]
        )

    def _refresh_eigendecompositions(self, state: dict[str, Any]) -> None:
        self._eigh_generation += 1
        if self._sync_free:
            self._refresh_on_device(state)
            return
        for factor in ("A", "G"):
            try:
                (eigenvalues, eigenvectors, retried), zero_rows = deflated_symmetric_eigh(state[factor])
            except EigendecompositionError as error:
                self._counters["eigh_retries"] += len(error.dtypes) - 1
            else:
                self._counters["eigh_retries"] += int(retried)
                state[f"eigenvalues_{factor}"], state[f"eigenvectors_{factor}"] = eigenvalues, eigenvectors
                state[f"zero_rows_{factor}"] = zero_rows
                continue
            self._counters["eigh_fallbacks"] += 1
            if f"eigenvectors_{factor}" not in state:
                size = state[factor].shape[0]
                identity = torch.eye(size, dtype=state[factor].dtype, device=state[factor].device)
                state[f"eigenvalues_{factor}"] = identity.diagonal().clone()
                state[f"eigenvectors_{factor}"] = identity
                state[f"zero_rows_{factor}"] = torch.zeros(0, dtype=torch.int64, device=identity.device)
        state["updates_since_eigh"] = 0

    def _live_block(self, state: dict[str, Any], factor: str) -> LiveBlock | None:
        """The :data:`LiveBlock` of ``factor``'s ("A" or "G") current eigenbasis when its
        decomposition deflated zero rows, else None (always None with ``sync_free``). It is
        gathered once per eigenbasis and cached off the state: it is derived, not saved."""
        zero_rows = state.get(f"zero_rows_{factor}")
        if zero_rows is None or zero_rows.numel() == 0 or self._sync_free:
            return None
        eigenvectors = state[f"eigenvectors_{factor}"]
        cached = self._live_blocks.get((id(state), factor))
        if cached is not None and cached[0] is eigenvectors:
            return cached[1]
        live = torch.ones(eigenvectors.shape[0], dtype=torch.bool, device=eigenvectors.device)
        live[zero_rows] = False
        live_rows = torch.nonzero(live).squeeze(1)
        block = (zero_rows, live_rows, eigenvectors[live_rows][:, zero_rows.numel():].contiguous())
        self._live_blocks[(id(state), factor)] = (eigenvectors, block)
        return block

    def _truncated_basis(self, state: dict[str, Any], damping: float, tolerance: float) -> TruncatedBasis:
        """:func:`_truncated_basis` of the layer's current eigenbases, gathered once per
        eigendecomposition (and damping, tolerance) and cached off the state: derived, not saved."""
        key = (state["eigenvectors_A"], state["eigenvectors_G"], damping, tolerance)
        cached = self._truncated.get(id(state))
        if cached is not None and all(a is b if isinstance(a, Tensor) else a == b for a, b in zip(cached[0], key)):
            return cached[1]
        basis = _truncated_basis(
            state["eigenvalues_A"], state["eigenvectors_A"], state["eigenvalues_G"], state["eigenvectors_G"],
            damping, tolerance, self._live_block(state, "A"), self._live_block(state, "G"),
        )
        self._truncated[id(state)] = (key, basis)
        return basis

    def _refresh_on_device(self, state: dict[str, Any]) -> None:
        """The refresh of ``sync_free``: float32 (working dtype) only, no float64 retry; a
        decomposition that is not finite keeps the previous one, or the identity if there is
        none, chosen by ``torch.where`` and counted in ``eigh_fallbacks`` on the device."""
        for factor in ("A", "G"):
            matrix = state[factor]
            result = symmetric_eigh_on_device(matrix)
            values_key, vectors_key = f"eigenvalues_{factor}", f"eigenvectors_{factor}"
            if vectors_key in state:
                previous_values, previous_vectors = state[values_key], state[vectors_key]
            else:
                previous_vectors = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
                previous_values = previous_vectors.diagonal().clone()
            state[values_key] = torch.where(result.finite, result.eigenvalues, previous_values)
            state[vectors_key] = torch.where(result.finite, result.eigenvectors, previous_vectors)
            state.pop(f"zero_rows_{factor}", None)  # a host path's deflation (a loaded checkpoint's) is stale
            self._count("eigh_fallbacks", ~result.finite)
        state["updates_since_eigh"] = 0

    def _gradients(self, grads: Sequence[Tensor | None] | None) -> list[Tensor | None]:
        """∇ + weight_decay·θ per parameter (None where there is no gradient)."""
        group = self.param_groups[0]
        params: list[Tensor] = group["params"]
        if grads is None:
            grads = [p.grad for p in params]
        elif len(grads) != len(params):
            raise ValueError(
                f"Invalid grads: got {len(grads)} tensors for {len(params)} parameters"
            )
        weight_decay = group["weight_decay"]
        result: list[Tensor | None] = []
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                result.append(None)
                continue
            if grad.is_sparse:
                raise RuntimeError("KFAC does not support sparse gradients")
            if grad.shape != param.shape:
                raise ValueError(
                    f"Invalid grads: shape {tuple(grad.shape)} for a parameter of shape "
                    f"{tuple(param.shape)}"
                )
            result.append(grad.add(param, alpha=weight_decay) if weight_decay else grad)
        return result

    def _directions(self, gradients: list[Tensor | None]) -> tuple[list[Tensor | None], int | Tensor]:
        """Preconditioned directions V (plain ∇ outside K-FAC layers) and the number of
        K-FAC layers that had a gradient but no statistics yet (a device tensor with
        ``sync_free``, which also counts layers whose every batch was rejected)."""
        group = self.param_groups[0]
        directions = list(gradients)
        missing: list[str] = []
        no_statistics: list[Tensor] = []  # sync_free: per layer, whether no batch was accepted yet
        for layer in self._layers:
            weight_grad = gradients[layer.weight_index]
            bias_grad = None if layer.bias_index is None else gradients[layer.bias_index]
            if weight_grad is None and bias_grad is None:
                continue
            weight = self._param(layer.weight_index)
            state = self.state[weight]
            if "A" not in state:
                missing.append(layer.name)
                continue
            if (
                "eigenvectors_A" not in state
                or state["updates_since_eigh"] >= group["inverse_every"]
            ):
                self._refresh_eigendecompositions(state)
            # The combined [∇W | ∇b] gradient, (out, fan_in [+ 1]).
            fan_in = weight[0].numel()
            matrix = (torch.zeros_like(weight) if weight_grad is None else weight_grad).reshape(
                -1, fan_in
            )
            if layer.bias_index is not None:
                bias_column = weight.new_zeros(weight.shape[0]) if bias_grad is None else bias_grad
                matrix = torch.cat([matrix, bias_column.unsqueeze(1)], dim=1)
            tolerance = group.get("eigen_tolerance", 0.0)  # (absent from older checkpoints' groups)
            if tolerance > 0.0 and group["damping_mode"] == "eigen" and not self._sync_free:
                preconditioned = _precondition_truncated(
                    matrix, self._truncated_basis(state, group["damping"], tolerance), group["damping"]
                )
            else:
                preconditioned = _precondition_matrix(
                    matrix, state["eigenvectors_A"], state["eigenvectors_G"], self._denominator(state),
                    self._live_block(state, "A"), self._live_block(state, "G"), group["damping_mode"] == "eigen",
                )
            if self._sync_free:
                unseen = state["stat_updates"] == 0
                preconditioned = torch.where(unseen, matrix, preconditioned)
                no_statistics.append(unseen)
            if weight_grad is not None:
                directions[layer.weight_index] = preconditioned[:, :fan_in].reshape(weight.shape)
            if layer.bias_index is not None and bias_grad is not None:
                directions[layer.bias_index] = preconditioned[:, -1].clone()
        if missing and not self._warned_missing_statistics:
            self._warned_missing_statistics = True
            warnings.warn(
                f"KFAC: no statistics recorded yet for layers {missing}; they take plain "
                "gradient steps until a forward and backward pass run inside "
                "`with optimizer.track_statistics():`",
                RuntimeWarning,
                stacklevel=3,
            )
        if no_statistics:
            return directions, len(missing) + torch.stack(no_statistics).sum()
        return directions, len(missing)

    @torch.no_grad()
    def precondition(self, grads: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """The K-FAC direction V for every parameter, without changing any parameter.

        This is the direction :meth:`step` follows before the KL clip and momentum: the
        preconditioned ``grad + weight_decay·θ`` for K-FAC layers, the plain one elsewhere.
        Eigendecompositions that are due are refreshed.

        Args:
            grads: gradients to precondition, one per parameter in
                ``param_groups[0]["params"]`` (= ``module.parameters()`` order, trainable
                only), None entries meaning no gradient. Defaults to each ``param.grad``.

        Returns:
            One tensor per parameter, in the same order: zeros for a parameter without a
            gradient or with a non-finite direction (the latter counted in
            ``kfac/nonfinite_directions``).
        """
        gradients = self._gradients(grads)
        directions, _ = self._directions(gradients)
        params: list[Tensor] = self.param_groups[0]["params"]
        if self._sync_free:  # non-finite directions replaced by zeros on the device
            masked: list[Tensor] = []
            for param, direction in zip(params, directions, strict=True):
                if direction is None:
                    masked.append(torch.zeros_like(param))
                    continue
                usable = torch.isfinite(direction).all()
                masked.append(torch.where(usable, direction, torch.zeros_like(direction)))
                self._count("nonfinite_directions", ~usable)
            return masked
        present = [(i, d) for i, d in enumerate(directions) if d is not None]
        flags = [torch.isfinite(direction).all() for _, direction in present]
        finite: list[bool] = torch.stack(flags).tolist() if flags else []
        result = [torch.zeros_like(p) for p in self.param_groups[0]["params"]]
        for (index, direction), is_finite in zip(present, finite, strict=True):
            if is_finite:
                result[index] = direction
            else:
                self._counters["nonfinite_directions"] += 1
        return result

    # ------------------------------------------------------------------ step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """KFAC has exactly one parameter group, the module's trainable parameters."""
        if self.param_groups:
            raise ValueError(
                "Invalid param_group: KFAC holds exactly one group (its module's parameters); "
                "build another KFAC for other parameters"
            )
        super().add_param_group(param_group)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Take one KL-clipped K-FAC step (see the class docstring for the rule).

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it
                runs under ``torch.enable_grad()``.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        group = self.param_groups[0]
        lr: float = group["lr"]
        momentum: float = group["momentum"]
        params: list[Tensor] = group["params"]
        gradients = self._gradients(None)
        directions, unpreconditioned = self._directions(gradients)
        present = [
            (params[i], direction, gradient)
            for i, (direction, gradient) in enumerate(zip(directions, gradients, strict=True))
            if direction is not None and gradient is not None
        ]
        self._counters["steps"] += 1
        if self._sync_free and present:
            self._step_on_device(present, lr, momentum, group["kl_clip"], unpreconditioned)
            return loss
        kl_scale = 1.0
        vg_sum = 0.0
        if present:
            products = [(d * g).sum() for _, d, g in present]
            dtype = functools.reduce(torch.promote_types, (p.dtype for p in products))
            inner = torch.stack([p.to(dtype) for p in products])
            nonfinite = any_nonfinite([d for _, d, _ in present])
            # One host synchronisation per step: Σ⟨V, ∇⟩ and whether any direction is non-finite.
            vg_sum, any_bad = torch.cat([inner.sum().reshape(1), nonfinite.to(dtype)]).tolist()
            flags = [1.0] * len(present)
            if any_bad:  # rare: find which directions, and leave them out of Σ⟨V, ∇⟩
                finite_flags = torch.stack([torch.isfinite(d).all() for _, d, _ in present])
                inner = torch.where(finite_flags, inner, torch.zeros_like(inner))
                host = torch.cat([inner.sum().reshape(1), finite_flags.to(inner.dtype)]).tolist()
                vg_sum, flags = host[0], host[1:]
            kl_scale = _kl_scale(vg_sum, lr, group["kl_clip"])
            if kl_scale == 0.0:
                self._counters["skipped_steps"] += 1
            else:
                for (param, direction, _), flag in zip(present, flags, strict=True):
                    if flag != 1.0:
                        self._counters["nonfinite_directions"] += 1
                        continue
                    self._apply_update(param, direction, lr, momentum, kl_scale)
        self._record_step_stats(kl_scale, lr, vg_sum, unpreconditioned)
        return loss

    def _record_step_stats(
        self, kl_scale: float | Tensor, lr: float | Tensor, vg_sum: float | Tensor, unpreconditioned: int | Tensor
    ) -> None:
        self._step_stats = {
            "kfac/kl_scale": kl_scale,
            "kfac/effective_lr": lr * kl_scale,
            "kfac/lr": lr,
            "kfac/vg_sum": vg_sum,
            "kfac/predicted_kl": 0.5 * (lr * kl_scale) ** 2 * vg_sum,
            "kfac/unpreconditioned_layers": unpreconditioned
            if isinstance(unpreconditioned, Tensor)
            else float(unpreconditioned),
        }

    def _step_on_device(
        self,
        present: list[tuple[Tensor, Tensor, Tensor]],
        lr: float | Tensor,
        momentum: float,
        kl_clip: float | None,
        unpreconditioned: int | Tensor,
    ) -> None:
        """:meth:`step`'s rule with ``sync_free``: Σ⟨V, ∇⟩ over the finite directions, ν, the
        skip when ν = 0 and the per-parameter skip of a non-finite direction all decided by
        ``torch.where`` on the device (the counters too), so nothing is read by the host."""
        products = [(d * g).sum() for _, d, g in present]
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in products))
        finite_flags = torch.stack([torch.isfinite(d).all() for _, d, _ in present])
        inner = torch.stack([p.to(dtype) for p in products])
        vg_sum = torch.where(finite_flags, inner, torch.zeros_like(inner)).sum()
        kl_scale = _kl_scale_on_device(vg_sum, lr, kl_clip)
        take = kl_scale > 0.0
        self._count("skipped_steps", ~take)
        self._count("nonfinite_directions", take & ~finite_flags)
        for (param, direction, _), finite in zip(present, finite_flags, strict=True):
            self._apply_update_on_device(param, direction, lr, momentum, kl_scale, take & finite)
        self._record_step_stats(kl_scale, lr, vg_sum, unpreconditioned)

    def _apply_update_on_device(
        self, param: Tensor, direction: Tensor, lr: float | Tensor, momentum: float, kl_scale: Tensor, apply: Tensor
    ) -> None:
        """:meth:`_apply_update` where ``apply`` (a 0-d bool tensor) holds; elsewhere nothing
        changes. ``momentum_started`` (a device bool) marks a buffer that holds a first ``ν V``
        (torch.optim.SGD's start), which the host path marks by creating the buffer."""
        scaled = direction * kl_scale
        if momentum == 0.0:
            param.sub_(torch.where(apply, scaled * lr, torch.zeros_like(scaled)))
            return
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.where(apply, scaled, torch.zeros_like(scaled))
            state["momentum_started"] = apply.clone()
        else:
            buffer: Tensor = state["momentum_buffer"]
            blended = buffer * momentum + direction * ((1.0 - momentum) * kl_scale)
            started = state.get("momentum_started")  # None: a buffer the host path started
            if started is not None:
                blended = torch.where(started, blended, scaled)
                started.logical_or_(apply)
            buffer.copy_(torch.where(apply, blended, buffer))
        update = state["momentum_buffer"] * lr
        param.sub_(torch.where(apply, update, torch.zeros_like(update)))

    def _apply_update(
        self, param: Tensor, direction: Tensor, lr: float, momentum: float, kl_scale: float
    ) -> None:
        if momentum == 0.0:
            param.add_(direction, alpha=-lr * kl_scale)
            return
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = direction.mul(kl_scale)
        else:
            buffer = state["momentum_buffer"]
            buffer.mul_(momentum).add_(direction, alpha=(1.0 - momentum) * kl_scale)
        param.add_(state["momentum_buffer"], alpha=-lr)

    # ------------------------------------------------------------------ diagnostics and state

    @property
    def last_stats(self) -> dict[str, float | Tensor]:
        """Diagnostics for logging, grouped under ``kfac/``.

        From the last :meth:`step` (NaN before the first): ``kl_scale`` (ν), ``effective_lr``
        (lr·ν), ``lr``, ``vg_sum`` (Σ⟨V, ∇⟩), ``predicted_kl`` (½ (lr ν)² Σ⟨V, ∇⟩, the
        quadratic model of the step's KL), ``unpreconditioned_layers``. Current: ``damping``,
        ``eig_A_min``/``eig_A_max``/``eig_G_min``/``eig_G_max`` (extremes over layers of the
        clamped eigenvalues in use, NaN before any), ``cond_max`` (largest condition number of
        the damped Kronecker factor over layers). Cumulative counters: ``step``,
        ``eigh_retries``, ``eigh_fallbacks``, ``stats_rejected``, ``nonfinite_directions``,
        ``skipped_steps``.

        With ``sync_free`` the values computed on the device (ν, Σ⟨V, ∇⟩, the eigenvalue
        extremes, the counters other than ``step`` and ``eigh_retries``) are 0-d device tensors,
        to be read once with the other metrics (:func:`trpo_lab.agents.metrics.to_host`);
        otherwise every value is a float.
        """
        group = self.param_groups[0]
        nan = math.nan
        stats: dict[str, float | Tensor] = {
            key: nan
            for key in (
                "kfac/kl_scale",
                "kfac/effective_lr",
                "kfac/lr",
                "kfac/vg_sum",
                "kfac/predicted_kl",
                "kfac/unpreconditioned_layers",
            )
        }
        stats.update(self._step_stats)
        stats["kfac/damping"] = float(group["damping"])
        key = (self._eigh_generation, group["damping"], group["damping_mode"])
        if self._eigen_stats is None or self._eigen_stats[0] != key:
            self._eigen_stats = (key, self._eigen_extremes())
        stats.update(self._eigen_stats[1])
        stats["kfac/step"] = float(self._counters["steps"])
        for name in _COUNTER_NAMES[1:]:
            counter = self._counters[name]
            stats[f"kfac/{name}"] = counter if isinstance(counter, Tensor) else float(counter)
        return stats

    def _eigen_extremes(self) -> dict[str, float | Tensor]:
        """The eigenvalue extremes and largest condition number of :attr:`last_stats`; they
        change only when an eigendecomposition or the damping does, so they are cached (each
        is a host read, or, with ``sync_free``, device tensors)."""
        if self._sync_free:
            return self._eigen_extremes_on_device()
        nan = math.nan
        stats: dict[str, float | Tensor] = {}
        extremes: dict[str, list[float]] = {"A": [], "G": []}
        conditions: list[float] = []
        pieces: list[Tensor] = []  # per layer: min/max of λ_A, of λ_G, of the denominator
        for layer in self._layers:
            state = self.state[self._param(layer.weight_index)]
            if "eigenvalues_A" not in state:
                continue
            for tensor in (state["eigenvalues_A"], state["eigenvalues_G"], self._denominator(state)):
                pieces += [tensor.min().double(), tensor.max().double()]
        host = torch.stack(pieces).tolist() if pieces else []  # one device-to-host read for all layers
        for offset in range(0, len(host), 6):
            a_min, a_max, g_min, g_max, smallest, largest = host[offset : offset + 6]
            extremes["A"] += [a_min, a_max]
            extremes["G"] += [g_min, g_max]
            conditions.append(largest / smallest if smallest > 0 else math.inf)
        for factor, values in extremes.items():
            stats[f"kfac/eig_{factor}_min"] = min(values, default=nan)
            stats[f"kfac/eig_{factor}_max"] = max(values, default=nan)
        stats["kfac/cond_max"] = max(conditions, default=nan)
        return stats

    def _eigen_extremes_on_device(self) -> dict[str, float | Tensor]:
        """:meth:`_eigen_extremes` as 0-d float64 device tensors (NaN floats when no layer has any)."""
        pieces: dict[str, list[Tensor]] = {"A": [], "G": [], "cond": []}
        for layer in self._layers:
            state = self.state[self._param(layer.weight_index)]
            if "eigenvalues_A" not in state:
                continue
            for factor in ("A", "G"):
                pieces[factor].append(torch.stack(state[f"eigenvalues_{factor}"].double().aminmax()))
            smallest, largest = self._denominator(state).double().aminmax()
            pieces["cond"].append(torch.where(smallest > 0, largest / smallest, math.inf))
        if not pieces["cond"]:
            return {f"kfac/{key}": math.nan for key in ("eig_A_min", "eig_A_max", "eig_G_min", "eig_G_max", "cond_max")}
        stats: dict[str, float | Tensor] = {}
        for factor in ("A", "G"):
            extremes = torch.stack(pieces[factor])
            stats[f"kfac/eig_{factor}_min"] = extremes[:, 0].min()
            stats[f"kfac/eig_{factor}_max"] = extremes[:, 1].max()
        stats["kfac/cond_max"] = torch.stack(pieces["cond"]).max()
        return stats

    def replaced_state_tensors(self) -> list[Tensor]:
        """The state tensors this optimizer replaces and never modifies in place.

        Each layer's factors ``A`` and ``G`` and their eigendecompositions (eigenvalues,
        eigenvectors and deflated rows): a statistics update or a refresh assigns new tensors
        to their state keys and leaves the old ones as they were. They are nearly all of the
        state (35M values on ACKTR's Nature CNN), so :class:`~trpo_lab.agents.guard.UpdateGuard`
        keeps references to them in its snapshot instead of copies, and checks each for
        finiteness only once. The momentum buffers and counters are updated in place and are
        not listed.
        """
        return [state[key] for state in self.state.values() for key in _REPLACED_KEYS if key in state]

    def state_dict(self) -> dict[str, Any]:
        """torch.optim state (per parameter: factors A and G, their eigendecompositions,
        update counters, momentum buffers) plus the optimizer-wide counters."""
        state_dict = super().state_dict()
        state_dict["kfac_counters"] = {
            name: value.clone() if isinstance(value, Tensor) else value for name, value in self._counters.items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; a KFAC on an identical module then continues exactly."""
        state_dict = dict(state_dict)
        counters = state_dict.pop("kfac_counters", {})
        super().load_state_dict(state_dict)
        self._eigh_generation += 1
        # torch.optim casts every tensor in the state to its parameter's dtype; restore the
        # device-resident path's bookkeeping dtypes.
        for param_state in self.state.values():
            if isinstance(param_state.get("stat_updates"), Tensor):
                param_state["stat_updates"] = param_state["stat_updates"].to(torch.int64)
            if "momentum_started" in param_state:
                param_state["momentum_started"] = param_state["momentum_started"].to(torch.bool)
            for factor in ("A", "G"):
                if f"zero_rows_{factor}" in param_state:
                    param_state[f"zero_rows_{factor}"] = param_state[f"zero_rows_{factor}"].to(torch.int64)
        unknown = set(counters) - set(_COUNTER_NAMES)
        if unknown:
            raise ValueError(f"Invalid kfac_counters: unknown names {sorted(unknown)}")
        for name, value in counters.items():
            if self._sync_free and name in _DEVICE_COUNTER_NAMES:
                current = self._counters[name]
                assert isinstance(current, Tensor)
                self._counters[name] = torch.as_tensor(value, dtype=torch.int64).to(current.device)
            else:
                self._counters[name] = int(value)


def _find_layers(module: nn.Module, params: Sequence[Tensor]) -> list[_Layer]:
    """The Linear and Conv2d (groups=1) layers whose weight and bias are trainable, in this
    optimizer, and owned by no other module (tied weights take plain gradient steps)."""
    index_of = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = {}
    for submodule in module.modules():
        for param in submodule.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    layers: list[_Layer] = []
    for name, submodule in module.named_modules():
        if not isinstance(submodule, nn.Linear | nn.Conv2d):
            continue
        if isinstance(submodule, nn.Conv2d) and submodule.groups != 1:
            continue
        own = [submodule.weight] + ([] if submodule.bias is None else [submodule.bias])
        if any(id(p) not in index_of or owners[id(p)] > 1 for p in own):
            continue
        layers.append(
            _Layer(
                name=name or type(submodule).__name__,
                module=submodule,
                weight_index=index_of[id(submodule.weight)],
                bias_index=None if submodule.bias is None else index_of[id(submodule.bias)],
            )
        )
    return layers
