"""Tests for trpo_lab.optim.kfac: factors against exact expectations, the preconditioner
against a dense Kronecker solve, the KL clip by hand, robustness, save/load, learning."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trpo_lab.optim.kfac import KFAC


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """These problems are tiny: intra-op threads only add contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias))
    return model.to(dtype)


def _fisher_pass(
    optimizer: KFAC, model: nn.Module, inputs: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """The recommended supervised Fisher pass: targets sampled from the model (true Fisher).
    Returns the logits, whose graph is kept for the loss backward."""
    with optimizer.track_statistics():
        logits = model(inputs)
        probabilities = F.softmax(logits.detach(), dim=-1)
        sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        F.cross_entropy(logits, sampled).backward(retain_graph=True)
    return logits


def _training_step(
    optimizer: KFAC,
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    generator: torch.Generator | None = None,
) -> None:
    logits = _fisher_pass(optimizer, model, inputs, generator)
    optimizer.zero_grad()
    F.cross_entropy(logits, targets).backward()
    optimizer.step()


def _with_ones(rows: Tensor) -> Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


# --------------------------------------------------------------------------------------
# Factors equal the exact expectations
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_factors_equal_exact_expectations(bias: bool) -> None:
    model = _mlp(dtype=torch.float64, bias=bias)
    inputs = torch.randn(7, 3, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    optimizer = KFAC(model)
    with optimizer.track_statistics():
        F.cross_entropy(model(inputs), targets).backward()

    # The same forward by hand, keeping activations and pre-activation gradients.
    first, second = model[0], model[2]
    pre_first = first(inputs)
    pre_first.retain_grad()
    hidden = torch.tanh(pre_first)
    pre_second = second(hidden)
    pre_second.retain_grad()
    F.cross_entropy(pre_second, targets).backward()
    batch = inputs.shape[0]
    for layer, activations, pre in ((first, inputs, pre_first), (second, hidden, pre_second)):
        rows = _with_ones(activations.detach()) if bias else activations.detach()
        per_sample_grads = batch * pre.grad  # the loss is a mean: undo the 1/N
        expected_a = rows.T @ rows / batch
        expected_g = per_sample_grads.T @ per_sample_grads / batch
        state = optimizer.state[layer.weight]
        torch.testing.assert_close(state["A"], expected_a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["G"], expected_g, rtol=1e-12, atol=1e-12)


def _reference_patches(
    inputs: Tensor,
    kernel: int,
    stride: int,
    dilation: int,
    pad: tuple[int, int, int, int],
    mode: str,
    out_hw: tuple[int, int],
) -> Tensor:
    """im2col by an explicit loop over output positions: (N, positions, C*k*k)."""
    padded = F.pad(inputs, pad, mode=mode)
    span = dilation * (kernel - 1) + 1
    patches = []
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            window = padded[
                :,
                :,
                i * stride : i * stride + span : dilation,
                j * stride : j * stride + span : dilation,
            ]
            patches.append(window.reshape(inputs.shape[0], -1))
    return torch.stack(patches, dim=1)


@pytest.mark.parametrize(
    ("conv_kwargs", "pad", "mode"),
    [
        (dict(kernel_size=3, padding=1, stride=2), (1, 1, 1, 1), "constant"),
        (dict(kernel_size=3, padding="same", dilation=2), (2, 2, 2, 2), "constant"),
        (dict(kernel_size=2, padding="same"), (0, 1, 0, 1), "constant"),
        (dict(kernel_size=3, padding=1, stride=2, padding_mode="reflect"), (1, 1, 1, 1), "reflect"),
    ],
    ids=["pad1-stride2", "same-dilation2", "same-asymmetric", "reflect"],
)
def test_conv2d_factors_equal_exact_expectations(
    conv_kwargs: dict[str, object], pad: tuple[int, int, int, int], mode: str
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **conv_kwargs).double()  # type: ignore[arg-type]
    inputs = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    weights = torch.randn(3, dtype=torch.float64)

    def loss_of(outputs: Tensor) -> Tensor:  # a mean over the batch
        return (torch.sin(outputs).sum(dim=(2, 3)) @ weights).mean()

    optimizer = KFAC(conv)
    with optimizer.track_statistics():
        loss_of(conv(inputs)).backward()
    weight_grad, bias_grad = conv.weight.grad.clone(), conv.bias.grad.clone()

    outputs = conv(inputs)
    outputs.retain_grad()
    loss_of(outputs).backward()
    batch, channels, out_h, out_w = outputs.shape
    patches = _reference_patches(
        inputs, conv.kernel_size[0], conv.stride[0], conv.dilation[0], pad, mode, (out_h, out_w)
    )
    rows = _with_ones(patches.reshape(-1, patches.shape[-1]))
    raw_grads = outputs.grad.permute(0, 2, 3, 1).reshape(-1, channels)
    # The patches line up with the weight layout: Σ_{n,t} g a^T is the [∇W | ∇b] gradient.
    combined = raw_grads.T @ rows
    torch.testing.assert_close(combined[:, :-1].reshape(conv.weight.shape), weight_grad)
    torch.testing.assert_close(combined[:, -1], bias_grad)

    expected_a = rows.T @ rows / rows.shape[0]  # mean over samples and positions
    per_sample_grads = (batch * outputs.grad).permute(0, 2, 3, 1)  # (N, H, W, C)
    expected_g = (
        sum(
            per_sample_grads[n].reshape(-1, channels).T @ per_sample_grads[n].reshape(-1, channels)
            for n in range(batch)
        )
        / batch
    )  # sum over positions, mean over samples (KFC)
    state = optimizer.state[conv.weight]
    torch.testing.assert_close(state["A"], expected_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["G"], expected_g, rtol=1e-12, atol=1e-12)


def test_linear_over_positions_averages_a_and_sums_g_per_sample() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    inputs = torch.randn(4, 5, 3, dtype=torch.float64)  # (batch, positions, features)
    optimizer = KFAC(layer)
    with optimizer.track_statistics():
        torch.sin(layer(inputs)).sum(dim=(1, 2)).mean().backward()

    outputs = layer(inputs)
    outputs.retain_grad()
    torch.sin(outputs).sum(dim=(1, 2)).mean().backward()
    rows = _with_ones(inputs.reshape(-1, 3))
    per_sample_grads = 4 * outputs.grad  # (4, 5, 2): the loss is a mean over the batch only
    expected_g = torch.einsum("ntc,ntd->cd", per_sample_grads, per_sample_grads) / 4
    torch.testing.assert_close(optimizer.state[layer.weight]["A"], rows.T @ rows / 20)
    torch.testing.assert_close(optimizer.state[layer.weight]["G"], expected_g)


def test_g_is_taken_before_an_inplace_activation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).double()
    inputs = torch.randn(8, 3, dtype=torch.float64)
    optimizer = KFAC(model)
    with optimizer.track_statistics():
        model(inputs).pow(2).sum(dim=1).mean().backward()

    pre = model[0](inputs)
    pre.retain_grad()
    model[2](torch.relu(pre)).pow(2).sum(dim=1).mean().backward()
    per_sample_grads = 8 * pre.grad
    expected_g = per_sample_grads.T @ per_sample_grads / 8
    torch.testing.assert_close(optimizer.state[model[0].weight]["G"], expected_g)


def test_running_average_is_bias_free_and_starts_at_the_first_batch() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False).double()
    decay = 0.6
    optimizer = KFAC(layer, stat_decay=decay)
    batches = [torch.randn(5, 3, dtype=torch.float64) * (k + 1) for k in range(3)]
    expected_batches = [x.T @ x / 5 for x in batches]
    for step, inputs in enumerate(batches):
        with optimizer.track_statistics():
            layer(inputs).sum(dim=1).mean().backward()
        weights = [decay ** (step - k) for k in range(step + 1)]
        expected = sum(w * b for w, b in zip(weights, expected_batches[: step + 1], strict=True))
        expected = expected / sum(weights)
        torch.testing.assert_close(optimizer.state[layer.weight]["A"], expected)
        if step == 0:
            torch.testing.assert_close(optimizer.state[layer.weight]["A"], expected_batches[0])


# --------------------------------------------------------------------------------------
# The preconditioner against a dense Kronecker solve
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_preconditioned_gradient_equals_dense_kronecker_solve(
    batch: int, damping_mode: str
) -> None:
    torch.manual_seed(batch)
    layer = nn.Linear(3, 2).double()
    damping = 0.03
    kwargs = {} if damping_mode == "eigen" else {"damping_mode": damping_mode}
    optimizer = KFAC(layer, damping=damping, **kwargs)  # type: ignore[arg-type]
    inputs = torch.randn(batch, 3, dtype=torch.float64)
    with optimizer.track_statistics():
        torch.sin(layer(inputs)).sum(dim=1).mean().backward()
    weight_grad = torch.randn(2, 3, dtype=torch.float64)
    bias_grad = torch.randn(2, dtype=torch.float64)
    direction_weight, direction_bias = optimizer.precondition([weight_grad, bias_grad])

    a_factor = optimizer.state[layer.weight]["A"]
    g_factor = optimizer.state[layer.weight]["G"]
    if damping_mode == "eigen":
        # The default: (A ⊗ G + damping·I)^-1, damping·I in the Kronecker eigenbasis.
        curvature = torch.kron(a_factor, g_factor) + damping * torch.eye(8, dtype=torch.float64)
    else:
        pi = math.sqrt((a_factor.trace() / 4) / (g_factor.trace() / 2))
        root = math.sqrt(damping)
        curvature = torch.kron(
            a_factor + pi * root * torch.eye(4, dtype=torch.float64),
            g_factor + root / pi * torch.eye(2, dtype=torch.float64),
        )
    combined = torch.cat([weight_grad, bias_grad.unsqueeze(1)], dim=1)  # [∇W | ∇b], (2, 4)
    # vec stacks columns, and (A ⊗ G) vec(X) = vec(G X A) for symmetric A.
    solution = torch.linalg.solve(curvature, combined.T.reshape(-1)).reshape(4, 2).T
    torch.testing.assert_close(direction_weight, solution[:, :3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(direction_bias, solution[:, 3], rtol=1e-8, atol=1e-10)


def test_identity_factors_without_damping_equal_plain_sgd() -> None:
    model = _mlp(dtype=torch.float64)
    reference = copy.deepcopy(model)
    inputs, targets = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    optimizer = KFAC(model, lr=0.3, momentum=0.0, damping=0.0, kl_clip=None)
    _fisher_pass(optimizer, model, inputs)
    for layer in (model[0], model[2]):
        state = optimizer.state[layer.weight]
        state["A"] = torch.eye(state["A"].shape[0], dtype=torch.float64)
        state["G"] = torch.eye(state["G"].shape[0], dtype=torch.float64)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.3)
    for net, opt in ((model, optimizer), (reference, sgd)):
        opt.zero_grad()
        F.cross_entropy(net(inputs), targets).backward()
        opt.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)


def test_other_parameters_take_the_plain_gradient_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model.log_std = nn.Parameter(torch.zeros(2))
    optimizer = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None)
    inputs = torch.randn(8, 3)
    with optimizer.track_statistics():
        model(inputs).pow(2).mean().backward()
    optimizer.zero_grad()
    (model(inputs).sum() + (model.log_std * torch.tensor([1.0, -2.0])).sum()).backward()
    plain = [model.log_std, model[1].weight, model[1].bias]
    before = {id(p): p.detach().clone() for p in model.parameters()}
    grads = {id(p): p.grad.clone() for p in model.parameters()}
    optimizer.step()
    for param in plain:
        torch.testing.assert_close(param, before[id(param)] - 0.1 * grads[id(param)])
    # The K-FAC layers, by contrast, do not follow the plain gradient.
    sgd_weight = before[id(model[0].weight)] - 0.1 * grads[id(model[0].weight)]
    assert not torch.allclose(model[0].weight, sgd_weight, atol=1e-4)


def test_momentum_averages_directions_and_weight_decay_joins_the_gradient() -> None:
    holder = nn.Module()
    holder.theta = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    lr, momentum, weight_decay = 0.1, 0.8, 0.5
    optimizer = KFAC(holder, lr=lr, momentum=momentum, weight_decay=weight_decay, kl_clip=None)
    theta = holder.theta.detach().clone()
    buffer = torch.zeros_like(theta)
    for step, coefficients in enumerate(([1.0, 3.0], [-2.0, 0.5], [0.0, 1.0])):
        optimizer.zero_grad()
        (holder.theta * torch.tensor(coefficients, dtype=torch.float64)).sum().backward()
        direction = torch.tensor(coefficients, dtype=torch.float64) + weight_decay * theta
        buffer = direction if step == 0 else momentum * buffer + (1 - momentum) * direction
        theta = theta - lr * buffer
        optimizer.step()
        torch.testing.assert_close(holder.theta.detach(), theta, rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------
# KL clip
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_clip", [1e-6, 10.0])
def test_kl_scale_matches_hand_computation(kl_clip: float) -> None:
    model = _mlp(dtype=torch.float64)
    model.log_std = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    inputs, targets = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 4, (10,))
    lr = 0.25
    optimizer = KFAC(model, lr=lr, momentum=0.9, kl_clip=kl_clip)
    logits = _fisher_pass(optimizer, model, inputs)
    optimizer.zero_grad()
    (F.cross_entropy(logits, targets) + model.log_std.pow(2).sum() + model.log_std.sum()).backward()
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]
    directions = optimizer.precondition()
    vg = sum((d * g).sum() for d, g in zip(directions, grads, strict=True))
    expected = min(1.0, math.sqrt(kl_clip / (lr**2 * float(vg))))
    assert (expected < 1.0) == (kl_clip < 1e-3)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    stats = optimizer.last_stats
    assert stats["kfac/kl_scale"] == pytest.approx(expected, rel=1e-10)
    assert stats["kfac/effective_lr"] == pytest.approx(lr * expected, rel=1e-10)
    assert stats["kfac/vg_sum"] == pytest.approx(float(vg), rel=1e-10)
    # The first momentum step moves by lr·ν·V.
    for param, old, direction in zip(params, before, directions, strict=True):
        torch.testing.assert_close(param, old - lr * expected * direction)


def test_zero_gradient_gives_no_nan_and_no_move() -> None:
    model = _mlp()
    inputs = torch.randn(6, 3)
    optimizer = KFAC(model)
    logits = _fisher_pass(optimizer, model, inputs)
    optimizer.zero_grad()
    (0.0 * logits.sum()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert optimizer.last_stats["kfac/kl_scale"] == 1.0
    for param, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, old)


def test_disabled_kl_clip_gives_unit_scale() -> None:
    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model, kl_clip=None)
    _training_step(optimizer, model, inputs, targets)
    assert optimizer.last_stats["kfac/kl_scale"] == 1.0


# --------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_raising_eigh_falls_back_to_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
        raise torch.linalg.LinAlgError("simulated failure to converge")

    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    damping, lr = 0.01, 0.1
    optimizer = KFAC(model, lr=lr, momentum=0.0, damping=damping, kl_clip=None)
    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    logits = _fisher_pass(optimizer, model, inputs)
    optimizer.zero_grad()
    F.cross_entropy(logits, targets).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    stats = optimizer.last_stats
    assert stats["kfac/eigh_retries"] == 4  # A and G of two layers, each retried in float64
    assert stats["kfac/eigh_fallbacks"] == 4
    # Identity factors: (I ⊗ I + damping·I)^-1 ∇ = ∇ / (1 + damping).
    for param, old, grad in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(param, old - lr * grad / (1 + damping))


def test_failed_eigh_keeps_previous_decomposition() -> None:
    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model, inverse_every=1)
    _training_step(optimizer, model, inputs, targets)
    state = optimizer.state[model[0].weight]
    previous = state["eigenvectors_A"].clone(), state["eigenvalues_A"].clone()
    _fisher_pass(optimizer, model, inputs)
    state["A"].fill_(float("nan"))  # a corrupted factor: float32 and float64 eigh both fail
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    stats = optimizer.last_stats
    assert stats["kfac/eigh_fallbacks"] == 1
    assert stats["kfac/eigh_retries"] == 1
    assert torch.equal(state["eigenvectors_A"], previous[0])
    assert torch.equal(state["eigenvalues_A"], previous[1])
    assert _all_finite(model)


def test_nonfinite_float32_eigh_is_retried_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh

    def float32_returns_nan(matrix: Tensor) -> tuple[Tensor, Tensor]:
        eigenvalues, eigenvectors = real_eigh(matrix)
        if matrix.dtype == torch.float32:
            return eigenvalues * float("nan"), eigenvectors
        return eigenvalues, eigenvectors

    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model)
    monkeypatch.setattr(torch.linalg, "eigh", float32_returns_nan)
    _training_step(optimizer, model, inputs, targets)
    stats = optimizer.last_stats
    assert stats["kfac/eigh_retries"] == 4 and stats["kfac/eigh_fallbacks"] == 0
    state = optimizer.state[model[0].weight]
    expected = real_eigh(state["A"].double())[0].clamp_min(0).float()
    torch.testing.assert_close(state["eigenvalues_A"], expected)
    assert _all_finite(model)


def test_nonfinite_statistics_batch_is_rejected() -> None:
    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model)
    _training_step(optimizer, model, inputs, targets)
    factors = {k: optimizer.state[model[0].weight][k].clone() for k in ("A", "G")}
    poisoned = inputs.clone()
    poisoned[2, 1] = float("nan")
    with optimizer.track_statistics():
        logits = model(poisoned)
        F.cross_entropy(logits, targets).backward()
    assert optimizer.last_stats["kfac/stats_rejected"] == 2  # NaN reaches both layers
    for key, value in factors.items():
        assert torch.equal(optimizer.state[model[0].weight][key], value)
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    assert _all_finite(model)


def test_nonfinite_direction_is_skipped_for_that_parameter_only() -> None:
    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model)
    logits = _fisher_pass(optimizer, model, inputs)
    optimizer.zero_grad()
    F.cross_entropy(logits, targets).backward()
    model[2].bias.grad[0] = float("nan")  # poisons the second layer's whole [W | b] direction
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert _all_finite(model)
    assert optimizer.last_stats["kfac/nonfinite_directions"] == 2
    assert 0.0 < optimizer.last_stats["kfac/kl_scale"] <= 1.0
    unchanged = [torch.equal(p, old) for p, old in zip(model.parameters(), before, strict=True)]
    assert unchanged == [False, False, True, True]
    # precondition() returns a zero direction for it too.
    assert torch.equal(optimizer.precondition()[3], torch.zeros_like(model[2].bias))


def test_ill_conditioned_factors_stay_finite() -> None:
    torch.manual_seed(0)
    model = _mlp()
    inputs = torch.randn(64, 3)
    inputs[:, 0] *= 1e4
    inputs[:, 1] = 1e-4 * inputs[:, 2]  # collinear, tiny: A is singular and badly scaled
    targets = torch.randint(0, 4, (64,))
    optimizer = KFAC(model, damping=1e-4, inverse_every=1, kl_clip=1e-3)
    for _ in range(5):
        _training_step(optimizer, model, inputs, targets)
    stats = optimizer.last_stats
    assert _all_finite(model)
    assert stats["kfac/eig_A_min"] >= 0.0
    assert stats["kfac/eig_A_max"] > 1e7
    assert 1e6 < stats["kfac/cond_max"] < math.inf


def test_negative_eigenvalues_are_clamped_at_zero() -> None:
    layer = nn.Linear(3, 2, bias=False).double()
    optimizer = KFAC(layer, damping=0.5)
    with optimizer.track_statistics():
        layer(torch.randn(4, 3, dtype=torch.float64)).sum(dim=1).mean().backward()
    state = optimizer.state[layer.weight]
    # An indefinite factor (what round-off does to a near-singular one): eigenvalue -0.5
    # times G's would cancel the damping and divide by zero.
    state["A"] = torch.diag(torch.tensor([-0.5, 1.0, 2.0], dtype=torch.float64))
    state["G"] = torch.eye(2, dtype=torch.float64)
    gradient = torch.ones(2, 3, dtype=torch.float64)
    (direction,) = optimizer.precondition([gradient])
    torch.testing.assert_close(
        state["eigenvalues_A"], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    )
    expected = gradient / (torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64) + 0.5)
    torch.testing.assert_close(direction, expected)


def test_zero_eigenvalue_without_damping_never_reaches_parameters() -> None:
    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randn(6, 4)
    optimizer = KFAC(model, damping=0.0, momentum=0.0)
    with optimizer.track_statistics():
        F.mse_loss(model(inputs), targets).backward()  # full-rank G, unlike a softmax's
    optimizer.precondition()
    state = optimizer.state[model[0].weight]
    state["eigenvalues_A"][0] = 0.0  # a singular factor with nothing to damp it: x / 0
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    F.mse_loss(model(inputs), targets).backward()
    optimizer.step()
    assert _all_finite(model)
    assert optimizer.last_stats["kfac/nonfinite_directions"] == 2
    assert optimizer.last_stats["kfac/cond_max"] == math.inf
    assert torch.equal(model[0].weight, before[0]) and torch.equal(model[0].bias, before[1])
    assert not torch.equal(model[2].weight, before[2])


# --------------------------------------------------------------------------------------
# Schedule, hooks, state
# --------------------------------------------------------------------------------------


def test_eigendecompositions_are_recomputed_every_inverse_every_updates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_eigh = torch.linalg.eigh
    calls: list[int] = []

    def counting_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(matrix.shape[0])
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model, inverse_every=3)
    counts = []
    for _ in range(7):
        _training_step(optimizer, model, inputs, targets)
        counts.append(len(calls))
    # Refreshed after statistics updates 1, 4 and 7: 2 layers x 2 factors each time.
    assert counts == [4, 4, 4, 8, 8, 8, 12]


def test_hooks_record_only_inside_track_statistics() -> None:
    model = _mlp()
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model)
    F.cross_entropy(model(inputs), targets).backward()  # outside: nothing recorded
    assert "A" not in optimizer.state[model[0].weight]
    with pytest.warns(RuntimeWarning, match="track_statistics"):
        optimizer.step()  # plain gradient steps until statistics exist
    assert optimizer.last_stats["kfac/unpreconditioned_layers"] == 2

    with torch.inference_mode():
        model(inputs)  # the module runs under inference mode, with or without tracking
        with optimizer.track_statistics():
            model(inputs)
    assert "A" not in optimizer.state[model[0].weight]

    logits = _fisher_pass(optimizer, model, inputs)  # forward inside, backward outside:
    factors = optimizer.state[model[0].weight]["A"].clone()
    F.cross_entropy(logits, targets).backward()  # the output hooks ignore this backward
    assert torch.equal(optimizer.state[model[0].weight]["A"], factors)
    assert all(not m._forward_hooks for m in model.modules())
    optimizer.remove_hooks()  # idempotent

    with pytest.raises(RuntimeError, match="nested"), optimizer.track_statistics():
        with optimizer.track_statistics():
            pass
    with pytest.raises(ValueError, match="boom"), optimizer.track_statistics():
        model(inputs).sum().backward()
        raise ValueError("boom")
    assert torch.equal(optimizer.state[model[0].weight]["A"], factors)  # batch discarded
    assert all(not m._forward_hooks for m in model.modules())


def test_record_statistics_without_hooks_equals_the_hooks() -> None:
    """track_statistics(hooks=False) + record_statistics(layer, inputs, dL/d output) gives the
    same factors, bit for bit, as the hooks; the Fisher backward can then stop at the outputs."""
    inputs = torch.randn(7, 3)
    hooked, manual = _mlp(seed=3), _mlp(seed=3)
    by_hooks, by_hand = KFAC(hooked), KFAC(manual)
    sampled = torch.randint(0, 4, (7,))
    with by_hooks.track_statistics():
        F.cross_entropy(hooked(inputs), sampled).backward()
    with by_hand.track_statistics(hooks=False):
        hidden = manual[0](inputs)
        logits = manual[2](manual[1](hidden))
        grads = torch.autograd.grad(F.cross_entropy(logits, sampled), [hidden, logits])
        by_hand.record_statistics(manual[0], inputs, grads[0])
        by_hand.record_statistics(manual[2], manual[1](hidden), grads[1])
        assert not any(m._forward_hooks for m in manual.modules())
    for a, b in zip(hooked, manual):
        if isinstance(a, nn.Linear):
            for factor in ("A", "G"):
                assert torch.equal(by_hooks.state[a.weight][factor], by_hand.state[b.weight][factor])

    with pytest.raises(RuntimeError, match="track_statistics"):
        by_hand.record_statistics(manual[0], inputs, grads[0])
    with pytest.raises(ValueError, match="not one of this KFAC's layers"), by_hand.track_statistics(hooks=False):
        by_hand.record_statistics(nn.Linear(3, 5), inputs, grads[0])


def test_precondition_leaves_parameters_alone() -> None:
    model = _mlp()
    model.unused = nn.Parameter(torch.ones(3))
    inputs, targets = torch.randn(6, 3), torch.randint(0, 4, (6,))
    optimizer = KFAC(model)
    logits = _fisher_pass(optimizer, model, inputs)
    optimizer.zero_grad()
    F.cross_entropy(logits, targets).backward()
    before = [p.detach().clone() for p in model.parameters()]
    directions = optimizer.precondition()
    assert [d.shape for d in directions] == [p.shape for p in model.parameters()]
    assert torch.equal(directions[0], torch.zeros(3))  # no gradient: zero direction
    for param, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(param, old)
    with pytest.raises(ValueError, match="grads"):
        optimizer.precondition([None])


def _train_steps(
    optimizer: KFAC, model: nn.Module, inputs: Tensor, targets: Tensor, seeds: range
) -> None:
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        _training_step(optimizer, model, inputs, targets, generator)


def test_state_dict_round_trip_continues_bit_identically() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4)
    )
    model.log_std = nn.Parameter(torch.zeros(4))
    inputs, targets = torch.randn(12, 1, 6, 6), torch.randint(0, 4, (12,))
    settings: dict[str, float] = dict(
        lr=0.2, momentum=0.9, kl_clip=1e-2, inverse_every=3, weight_decay=1e-3, stat_decay=0.9
    )
    optimizer = KFAC(model, **settings)  # type: ignore[arg-type]
    _train_steps(optimizer, model, inputs, targets, range(4))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    restored_model = copy.deepcopy(model)
    fresh_model = copy.deepcopy(model)
    restored = KFAC(restored_model, **settings)  # type: ignore[arg-type]
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer))
    fresh = KFAC(fresh_model, **settings)  # type: ignore[arg-type]

    for net, opt in ((model, optimizer), (restored_model, restored), (fresh_model, fresh)):
        _train_steps(opt, net, inputs, targets, range(4, 9))  # crosses a refresh at update 7
    for ours, theirs in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    for param, restored_param in zip(model.parameters(), restored_model.parameters(), strict=True):
        for key, value in optimizer.state[param].items():
            other = restored.state[restored_param][key]
            assert torch.equal(value, other) if isinstance(value, Tensor) else value == other
    assert optimizer.last_stats["kfac/step"] == restored.last_stats["kfac/step"] == 9
    # Without the saved state the continuation differs, so the comparison above has teeth.
    assert not torch.equal(model[3].weight, fresh_model[3].weight)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("lr", -0.1),
        ("momentum", 1.0),
        ("damping", -1e-3),
        ("kl_clip", 0.0),
        ("stat_decay", 1.0),
        ("inverse_every", 0),
        ("weight_decay", -1.0),
        ("damping_mode", "diagonal"),
        ("sync_free", "yes"),
    ],
)
def test_invalid_hyperparameters_are_named(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        KFAC(_mlp(), **{name: value})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------


def _spiral(points_per_class: int = 75, classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for label in range(classes):
        radius = torch.linspace(0.05, 1.0, points_per_class)
        angle = label * 2 * math.pi / classes + 2 * math.pi * radius
        angle = angle + 0.1 * torch.randn(points_per_class, generator=generator)
        points.append(torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1))
        labels.append(torch.full((points_per_class,), label))
    return torch.cat(points), torch.cat(labels)


def _classifier() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def _final_loss(
    model: nn.Module, step: Callable[[], None], inputs: Tensor, targets: Tensor
) -> float:
    for _ in range(50):
        step()
    with torch.no_grad():
        return float(F.cross_entropy(model(inputs), targets))


@pytest.mark.slow
def test_kfac_trains_a_classifier_faster_than_tuned_sgd() -> None:
    inputs, targets = _spiral()  # 300 points, 4 interleaved arms: a hard problem for SGD

    sgd_losses = []
    for lr in (0.1, 0.3, 1.0):
        model = _classifier()
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

        def sgd_step(model: nn.Module = model, sgd: torch.optim.SGD = sgd) -> None:
            sgd.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            sgd.step()

        sgd_losses.append(_final_loss(model, sgd_step, inputs, targets))

    model = _classifier()
    optimizer = KFAC(model, lr=0.5, momentum=0.9, kl_clip=0.1, stat_decay=0.95, inverse_every=5)
    generator = torch.Generator().manual_seed(1)
    kfac_loss = _final_loss(
        model, lambda: _training_step(optimizer, model, inputs, targets, generator), inputs, targets
    )
    with torch.no_grad():
        initial = float(F.cross_entropy(_classifier()(inputs), targets))
    assert kfac_loss < 0.5 * min(sgd_losses) < 0.5 * initial, (kfac_loss, sgd_losses)
    assert optimizer.last_stats["kfac/eigh_fallbacks"] == 0


@pytest.mark.parametrize("damping_mode", ["eigen", "factored"])
def test_dead_inputs_and_outputs_are_deflated_and_precondition_exactly(damping_mode: str) -> None:
    """Inputs that never fire make A's rows exactly 0, units that never activate make G's rows
    (and the next layer's A rows) 0. The refresh records them, the preconditioning then rotates
    by the live blocks only, and the direction is still the exact dense (A ⊗ G + γI)⁻¹∇ (or its
    factored-damping form); a saved and loaded optimizer gives it bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():  # hidden unit 2 never activates
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0
    inputs = torch.randn(40, 6, dtype=torch.float64)
    inputs[:, [1, 4]] = 0.0  # dead features: with the bias, A is 7 x 7 with rows 1 and 4 zero
    targets = torch.randint(0, 3, (40,))
    damping = 1e-2
    optimizer = KFAC(model, damping=damping, inverse_every=1, damping_mode=damping_mode)
    _training_step(optimizer, model, inputs, targets, torch.Generator().manual_seed(0))
    first, second = optimizer.state[model[0].weight], optimizer.state[model[2].weight]
    assert first["zero_rows_A"].tolist() == [1, 4] and first["zero_rows_G"].tolist() == [2]
    assert second["zero_rows_A"].tolist() == [2] and second["zero_rows_G"].numel() == 0

    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    directions = optimizer.precondition(grads)
    for index, state in ((0, first), (2, second)):
        gradient = torch.cat([grads[index], grads[index + 1].unsqueeze(1)], dim=1)  # [∇W | ∇b]
        # the factors as the eigenbases saw them (the latest fold came after the refresh)
        dense = {}
        for factor in ("A", "G"):
            values, vectors = state[f"eigenvalues_{factor}"], state[f"eigenvectors_{factor}"]
            dense[factor] = (vectors * values) @ vectors.mT
        size_a, size_g = dense["A"].shape[0], dense["G"].shape[0]
        if damping_mode == "eigen":
            fisher = torch.kron(dense["A"], dense["G"]) + damping * torch.eye(size_a * size_g, dtype=torch.float64)
        else:
            pi = ((dense["A"].trace() / size_a) / (dense["G"].trace() / size_g)).sqrt()
            eye_a, eye_g = torch.eye(size_a, dtype=torch.float64), torch.eye(size_g, dtype=torch.float64)
            fisher = torch.kron(dense["A"] + pi * damping**0.5 * eye_a, dense["G"] + damping**0.5 / pi * eye_g)
        exact = torch.linalg.solve(fisher, gradient.mT.reshape(-1)).reshape(size_a, size_g).mT
        ours = torch.cat([directions[index], directions[index + 1].unsqueeze(1)], dim=1)
        torch.testing.assert_close(ours, exact, rtol=1e-9, atol=1e-9)

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = KFAC(copy.deepcopy(model), damping=damping, inverse_every=1, damping_mode=damping_mode)
    restored.load_state_dict(torch.load(buffer))
    restored_first = restored.state[restored.param_groups[0]["params"][0]]
    assert restored_first["zero_rows_A"].dtype == restored_first["zero_rows_G"].dtype == torch.int64
    for ours, theirs in zip(directions, restored.precondition(grads), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tolerance", [1e-1, 1e-2, 1e-3])
def test_eigen_tolerance_drops_negligible_pairs_within_its_error_bound(tolerance: float) -> None:
    """eigen_tolerance = τ leaves out the eigenvector pairs with λ_G λ_A ≤ τγ: the direction
    is within τ‖V‖ of the exact dense (A ⊗ G + γI)⁻¹∇, fewer eigenvectors are kept than there
    are (the check must bite), and a saved and loaded optimizer gives it bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    inputs = torch.randn(200, 12, dtype=torch.float64) * torch.logspace(0, -3, 12, dtype=torch.float64)
    targets = torch.randint(0, 4, (200,))
    damping = 1e-2
    optimizer = KFAC(model, damping=damping, inverse_every=1, eigen_tolerance=tolerance)
    exact_optimizer = KFAC(copy.deepcopy(model), damping=damping, inverse_every=1)
    generator = torch.Generator().manual_seed(0)
    _training_step(optimizer, model, inputs, targets, generator)
    exact_optimizer.load_state_dict(optimizer.state_dict())
    assert exact_optimizer.param_groups[0]["eigen_tolerance"] == tolerance
    exact_optimizer.param_groups[0]["eigen_tolerance"] = 0.0

    optimizer.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    directions = optimizer.precondition(grads)
    kept = 0
    for index, weight in ((0, model[0].weight), (2, model[2].weight)):
        state = optimizer.state[weight]
        gradient = torch.cat([grads[index], grads[index + 1].unsqueeze(1)], dim=1)
        dense = {f: (state[f"eigenvectors_{f}"] * state[f"eigenvalues_{f}"]) @ state[f"eigenvectors_{f}"].mT
                 for f in ("A", "G")}
        size_a, size_g = dense["A"].shape[0], dense["G"].shape[0]
        fisher = torch.kron(dense["A"], dense["G"]) + damping * torch.eye(size_a * size_g, dtype=torch.float64)
        exact = torch.linalg.solve(fisher, gradient.mT.reshape(-1)).reshape(size_a, size_g).mT
        ours = torch.cat([directions[index], directions[index + 1].unsqueeze(1)], dim=1)
        error = float((ours - exact).norm() / exact.norm())
        assert 0.0 < error <= tolerance, (index, error)
        vectors_g, vectors_a, *_ = optimizer._truncated[id(state)][1]
        kept += vectors_a.shape[1] + vectors_g.shape[1]
        assert vectors_a.shape[1] < size_a
    exact_directions = exact_optimizer.precondition(grads)
    assert any(not torch.equal(a, b) for a, b in zip(directions, exact_directions, strict=True))

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored = KFAC(copy.deepcopy(model), damping=damping, inverse_every=1)
    restored.load_state_dict(torch.load(buffer))
    for ours, theirs in zip(directions, restored.precondition(grads), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eigen_tolerance": -0.1}, r"Invalid eigen_tolerance: -0.1"),
        ({"eigen_tolerance": 1.0}, r"Invalid eigen_tolerance: 1.0; expected a number in \[0, 1\)"),
        (
            {"eigen_tolerance": 1e-3, "damping_mode": "factored"},
            r'Invalid eigen_tolerance: 0.001; expected 0 with damping_mode="factored"',
        ),
    ],
)
def test_bad_eigen_tolerance_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KFAC(nn.Linear(3, 2), **kwargs)


@pytest.mark.parametrize("sync_free", [False, True])
def test_factors_and_eigenbases_are_replaced_never_modified_in_place(sync_free: bool) -> None:
    """The promise behind KFAC.replaced_state_tensors, on which the agents' update guard shares
    rather than copies them: statistics updates and refreshes assign new tensors."""
    model = _mlp()
    optimizer = KFAC(model, lr=0.1, inverse_every=2, sync_free=sync_free)
    torch.manual_seed(1)
    inputs, targets = torch.randn(32, 3), torch.randint(0, 4, (32,))
    _training_step(optimizer, model, inputs, targets)
    first_layer_a: list[Tensor] = []
    for _ in range(4):  # statistics every step, a refresh every second one
        before = [(t, t._version, t.clone()) for t in optimizer.replaced_state_tensors()]
        # two layers x (A, G, their eigenvalues and eigenvectors[, the host path's deflated rows])
        assert len(before) == 2 * (6 if sync_free else 8)
        first_layer_a.append(before[0][0])
        _training_step(optimizer, model, inputs, targets)
        for tensor, version, values in before:
            assert tensor._version == version and torch.equal(tensor, values)
    after = optimizer.replaced_state_tensors()[0]
    assert all(after is not earlier for earlier in first_layer_a)  # a new A after every statistics update


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=8, stride=4),  # the Nature CNN's first layer
        dict(kernel_size=(3, 2), stride=(1, 2)),
        dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), padding_mode="circular"),
    ],
    ids=["nature-conv1", "rectangular", "rectangular-circular"],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_rows_from_the_strided_view_equal_im2col(conv_kwargs: dict[str, object], channels_last: bool) -> None:
    from trpo_lab.optim.kfac import _conv2d_padding, _layer_input_rows

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, **conv_kwargs)  # type: ignore[arg-type]
    inputs = torch.randn(2, 3, 20, 17)
    if channels_last:
        inputs = inputs.to(memory_format=torch.channels_last)
    padded = F.pad(inputs, _conv2d_padding(conv), mode="circular") if any(_conv2d_padding(conv)) else inputs
    patches = F.unfold(padded, conv.kernel_size, stride=conv.stride)
    expected = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    rows = _layer_input_rows(conv, inputs)
    assert torch.equal(rows, expected)
    # and they reproduce the layer: s = W a + b at every sample and position
    outputs = conv(inputs).permute(0, 2, 3, 1).reshape(-1, 2)
    torch.testing.assert_close(rows @ conv.weight.reshape(2, -1).T + conv.bias, outputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("n_rows", "size", "bias"),
    [(600, 300, True), (1000, 577, False), (700, 640, True), (64, 400, True)],
    ids=["two-blocks", "five-uneven-blocks", "five-blocks-bias", "fewer-rows-than-columns"],
)
def test_wide_input_factor_is_the_exact_symmetric_product(n_rows: int, size: int, bias: bool) -> None:
    """The triangular product of wide factors (a convolution's patch rows) is RᵀR with the bias
    row and column, written in place; narrow ones keep the plain GEMM."""
    from trpo_lab.optim.kfac import _GRAM_BLOCK, _input_outer

    assert size >= 2 * _GRAM_BLOCK
    torch.manual_seed(0)
    rows = torch.randn(n_rows, size, dtype=torch.float64)
    extended = _with_ones(rows) if bias else rows
    outer = _input_outer(rows, bias)
    torch.testing.assert_close(outer, extended.T @ extended, rtol=1e-12, atol=1e-10)
    narrow = torch.randn(50, 2 * _GRAM_BLOCK - 1)
    assert torch.equal(_input_outer(narrow, False), narrow.mT @ narrow)


def test_wide_conv2d_factor_equals_exact_expectation() -> None:
    """A convolution with 32 x 3 x 3 = 288 patch features takes the triangular product: A is still
    the mean of a aᵀ over samples and positions."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 4, kernel_size=3).double()
    inputs = torch.randn(3, 32, 9, 9, dtype=torch.float64)
    optimizer = KFAC(conv)
    with optimizer.track_statistics():
        conv(inputs).square().mean().backward()
    patches = F.unfold(inputs, 3).transpose(1, 2).reshape(-1, 32 * 9)
    rows = _with_ones(patches)
    state = optimizer.state[conv.weight]
    torch.testing.assert_close(state["A"], rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("out", "fan_in", "kept_g", "kept_a", "g_first"),
    [(8, 40, 2, 30, True), (8, 40, 8, 5, False), (512, 3137, 192, 697, True), (512, 3137, 511, 540, False)],
)
def test_truncated_preconditioning_takes_the_cheaper_order(
    out: int, fan_in: int, kept_g: int, kept_a: int, g_first: bool
) -> None:
    """The order of the truncated sandwich is the one with fewer multiply-adds (both occur)."""
    from trpo_lab.optim.kfac import _g_side_first

    g_cost = kept_g * out * fan_in + kept_g * fan_in * kept_a
    a_cost = out * fan_in * kept_a + kept_g * out * kept_a
    assert (g_cost <= a_cost) is g_first
    assert _g_side_first(out, fan_in, kept_g, kept_a) is g_first


@pytest.mark.parametrize("kept", [(2, 30), (8, 5)], ids=["g_first", "a_first"])
@pytest.mark.parametrize("dead", [(0, 0), (3, 0), (0, 11), (3, 11)], ids=["none", "g_rows", "a_rows", "both"])
def test_truncated_preconditioning_on_live_rows_matches_the_formula(
    kept: tuple[int, int], dead: tuple[int, int]
) -> None:
    """∇/γ − Q_G[(Q_Gᵀ∇Q_A) ⊙ C]Q_Aᵀ in either order, with the kept eigenvectors stored on the
    live rows where the decompositions deflated zero rows: V is ∇/γ on the zero rows and
    columns and the full formula everywhere (the gradient is not 0 there)."""
    from trpo_lab.optim.kfac import _precondition_truncated

    out, fan_in, damping = 8, 40, 0.01
    generator = torch.Generator().manual_seed(0)

    def basis(size: int, n_dead: int, n_kept: int) -> tuple[Tensor, Tensor | None]:
        live = torch.randperm(size, generator=generator)[n_dead:].sort().values
        full = torch.zeros(size, n_kept, dtype=torch.float64)
        full[live] = torch.linalg.qr(torch.randn(live.numel(), live.numel(), dtype=torch.float64,
                                                 generator=generator))[0][:, :n_kept]
        return full, (live if n_dead else None)

    grad = torch.randn(out, fan_in, dtype=torch.float64, generator=generator)
    full_g, live_g = basis(out, dead[0], min(kept[0], out - dead[0]))
    full_a, live_a = basis(fan_in, dead[1], min(kept[1], fan_in - dead[1]))
    correction = torch.rand(full_g.shape[1], full_a.shape[1], dtype=torch.float64, generator=generator)
    expected = grad / damping - full_g @ ((full_g.mT @ grad @ full_a) * correction) @ full_a.mT
    stored_g = full_g if live_g is None else full_g[live_g]
    stored_a = full_a if live_a is None else full_a[live_a]
    ours = _precondition_truncated(grad, (stored_g, stored_a, correction, live_g, live_a), damping)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-10)
