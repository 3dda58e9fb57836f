"""torch.distributed helpers on 2 gloo processes (spawned by the test)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from spawn_ranks import spawn_two

from trpo_lab.distributed import RankDriftError, init_distributed


def _bootstrap(rank: int, world: int, port: int, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    ctx = init_distributed("gloo", timeout_s=timeout_s)
    assert ctx is not None and ctx.rank == rank and ctx.world_size == world
    return ctx


def _reductions_worker(rank: int, port: int, out_dir: str) -> None:
    from gymnasium.wrappers.utils import RunningMeanStd

    ctx = _bootstrap(rank, 2, port)
    # sample-weighted means: rank 0 has 1 sample of value 1, rank 1 has 3 samples of value 5
    n_local = [1, 3][rank]
    total = ctx.total_count(n_local)
    mean = ctx.weighted_mean(torch.tensor([1.0, 5.0][rank]), n_local, total)
    # gradients, one bucket
    lin = torch.nn.Linear(2, 1)
    ctx.broadcast_module_(lin)
    lin.weight.grad = torch.full_like(lin.weight, float(rank + 1))
    lin.bias.grad = None
    ctx.all_reduce_grads_(list(lin.parameters()), n_local, total)
    # running mean/std merge, twice, against statistics of all data
    rng = np.random.default_rng(rank)
    rms = RunningMeanStd(shape=(3,))
    base = None
    for chunk in range(2):
        data = rng.normal(loc=rank, size=(10 + 5 * rank, 3))
        rms.update(data)
        base = ctx.merge_running_mean_std_(rms, base)
        np.save(Path(out_dir) / f"data_{rank}_{chunk}.npy", data)
    torch.save(
        {"total": total, "mean": mean, "weight_grad": lin.weight.grad, "bias_grad": lin.bias.grad,
         "weight": lin.weight.detach(), "rms": (rms.mean, rms.var, rms.count)},
        Path(out_dir) / f"rank{rank}.pt",
    )
    # drift check passes in sync, fails once one rank changes a parameter
    ctx.check_in_sync(lin)
    if rank == 1:
        with torch.no_grad():
            lin.bias.add_(1e-3)
    try:
        ctx.check_in_sync(lin)
    except RankDriftError as exc:
        (Path(out_dir) / f"drift{rank}.txt").write_text(str(exc))
    ctx.close()


def test_reductions_broadcast_merge_and_drift(tmp_path: Path) -> None:
    spawn_two(_reductions_worker, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["total"] == r1["total"] == 4
    torch.testing.assert_close(r0["mean"], torch.tensor(4.0))  # (1*1 + 3*5) / 4
    torch.testing.assert_close(r0["weight_grad"], torch.full((1, 2), (1 * 1 + 3 * 2) / 4))
    torch.testing.assert_close(r0["bias_grad"], torch.zeros(1))
    assert torch.equal(r0["weight"], r1["weight"])
    data = np.concatenate([np.load(tmp_path / f"data_{r}_{c}.npy") for r in (0, 1) for c in (0, 1)])
    for r in (r0, r1):
        mean, var, count = r["rms"]
        np.testing.assert_allclose(mean, data.mean(0), rtol=1e-4, atol=1e-4)  # RunningMeanStd starts at count 1e-4
        np.testing.assert_allclose(var, data.var(0), rtol=1e-3, atol=1e-3)
        assert count == pytest.approx(len(data), abs=1e-3)
    assert "drifted apart" in (tmp_path / "drift0.txt").read_text()
    assert "drifted apart" in (tmp_path / "drift1.txt").read_text()


def _dead_rank_worker(rank: int, port: int, out_dir: str) -> None:
    ctx = _bootstrap(rank, 2, port, timeout_s=5.0)
    if rank == 1:
        os._exit(0)  # dies without a word
    start = time.monotonic()
    try:
        ctx.all_reduce_sum(torch.ones(3))
        ctx.all_reduce_sum(torch.ones(3))
    except RuntimeError as exc:
        (Path(out_dir) / "error.txt").write_text(f"{time.monotonic() - start:.1f} {type(exc).__name__}")


def test_dead_rank_makes_the_other_fail_within_the_timeout(tmp_path: Path) -> None:
    # The dead rank's exit code surfaces as ProcessExitedException or not: the survivor catches
    # its error and exits 0, unless a broken gloo pair aborts it at interpreter exit (about
    # half the time with gloo).
    with contextlib.suppress(Exception):
        spawn_two(_dead_rank_worker, str(tmp_path))
    text = (tmp_path / "error.txt").read_text().split()
    assert float(text[0]) < 60.0


def test_single_process_is_not_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() is None


def test_minibatch_plan_gives_every_rank_the_same_number_of_minibatches() -> None:
    from trpo_lab.distributed import minibatch_plan, split_sizes

    assert split_sizes(10, 3) == [4, 3, 3]
    sizes = [130, 117]
    plans = [minibatch_plan(sizes, rank, batch_size=64) for rank in (0, 1)]
    assert len(plans[0]) == len(plans[1]) == 4  # ceil(247 / 64)
    for plan, size in zip(plans, sizes):
        assert plan[0][0] == 0 and plan[-1][1] == size
        assert all(stop > start for start, stop, _ in plan)
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    for j in range(4):
        p0, p1 = plans[0][j], plans[1][j]
        assert p0[2] == p1[2] == (p0[1] - p0[0]) + (p1[1] - p1[0])
    # one rank with fewer samples than minibatches: no empty minibatch on any rank
    tiny = [minibatch_plan([3, 100], rank, batch_size=8) for rank in (0, 1)]
    assert len(tiny[0]) == len(tiny[1]) == 3 and all(stop > start for start, stop, _ in tiny[0])


def test_kfac_statistics_reducer_sees_every_batch_factor_before_the_running_average() -> None:
    from trpo_lab.optim.kfac import KFAC

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    seen: list[tuple[list[tuple[int, ...]], list[float]]] = []

    def double(factors: list[torch.Tensor], counts: list[float]) -> list[torch.Tensor]:
        seen.append(([tuple(f.shape) for f in factors], counts))
        return [2.0 * f for f in factors]

    plain, reduced = KFAC(model, stat_decay=0.5), KFAC(model, stat_decay=0.5, statistics_reducer=double)
    x = torch.randn(5, 3)
    for opt in (plain, reduced):
        with opt.track_statistics():
            model(x).square().mean().backward()
    assert seen == [([(4, 4), (4, 4), (5, 5), (2, 2)], [5.0, 5.0, 5.0, 5.0])]
    for layer in model[0], model[2]:
        for factor in ("A", "G"):
            torch.testing.assert_close(reduced.state[layer.weight][factor], 2.0 * plain.state[layer.weight][factor])


def _kfac_worker(rank: int, port: int, out_dir: str) -> None:
    from trpo_lab.optim.kfac import KFAC

    ctx = _bootstrap(rank, 2, port)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(7, 3)
    part = x[:3] if rank == 0 else x[3:]  # unequal sample counts
    opt = KFAC(model, statistics_reducer=ctx.weighted_means)
    with opt.track_statistics():
        model(part).square().mean().backward()
    torch.save([opt.state[model[i].weight][f] for i in (0, 2) for f in ("A", "G")], Path(out_dir) / f"kfac{rank}.pt")
    ctx.close()


def test_kfac_factors_reduced_over_ranks_equal_the_factors_of_the_whole_batch(tmp_path: Path) -> None:
    from trpo_lab.optim.kfac import KFAC

    spawn_two(_kfac_worker, str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(7, 3)
    rank0_only = KFAC(model)
    with rank0_only.track_statistics():
        model(x[:3]).square().mean().backward()
    whole = KFAC(model)
    with whole.track_statistics():
        model(x).square().mean().backward()
    expected = [whole.state[model[i].weight][f] for i in (0, 2) for f in ("A", "G")]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"kfac{rank}.pt")
        torch.testing.assert_close(got[0], expected[0])  # A: input second moments of all 7 samples
        torch.testing.assert_close(got[2], expected[2])
        # G: per-sample output gradients (each rank's mean loss rescaled by its own batch size)
        torch.testing.assert_close(got[1], expected[1])
        torch.testing.assert_close(got[3], expected[3])
    assert not torch.allclose(rank0_only.state[model[0].weight]["A"], expected[0])


def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    from trpo_lab.distributed import Reducer

    ctx = _bootstrap(rank, 2, port)
    reducer = Reducer(ctx)
    rows = 3 if rank == 0 else 5  # unequal row counts: the buckets are padded
    reducer.share_batch_sizes(rows)
    obs = torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 2, 2) + 100 * rank
    actions = torch.arange(rows, dtype=torch.long) + 10 * rank
    values = torch.linspace(0, 1, rows, dtype=torch.float64) + rank
    gathered = reducer.gather([obs, actions, values])
    replica = reducer.replicated()
    reductions = ctx.traffic.reductions
    # a batch of Dict observations: every key travels in the same collective and keeps its dtype
    from trpo_lab.rollout.buffer import RolloutBatch

    dict_obs = {"frame": (obs * 2).to(torch.uint8), "target": actions.clone()}
    batch = RolloutBatch(dict_obs, actions, *(values.float(),) * 4)
    gathered_batch = reducer.gather_batch(batch)
    torch.save({"mine": (obs, actions, values), "gathered": gathered, "counts": (replica.local_count, replica.total_count),
                "plan": replica.minibatch_plan(8, 3), "reductions": reductions,
                "dict_mine": dict_obs, "dict_gathered": gathered_batch.observations,
                "batch_reductions": ctx.traffic.reductions - reductions},
               Path(out_dir) / f"gather{rank}.pt")
    ctx.close()


def test_gather_returns_every_ranks_rows_in_rank_order_in_one_collective(tmp_path: Path) -> None:
    spawn_two(_gather_worker, str(tmp_path))
    r0 = torch.load(tmp_path / "gather0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "gather1.pt", weights_only=False)
    for field, (a, b) in enumerate(zip(r0["mine"], r1["mine"])):
        expected = torch.cat([a, b])
        for result in (r0, r1):
            got = result["gathered"][field]
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert r0["counts"] == r1["counts"] == (8, 8)  # the replica's batch is every rank's samples
    assert r0["plan"] == r1["plan"] == [(0, 3, 3), (3, 6, 3), (6, 8, 2)]  # the single-process plan
    assert r0["reductions"] == r1["reductions"] == 2  # the batch sizes, then one gather
    for key in ("frame", "target"):
        expected = torch.cat([r0["dict_mine"][key], r1["dict_mine"][key]])
        for result in (r0, r1):
            got = result["dict_gathered"][key]
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert r0["batch_reductions"] == r1["batch_reductions"] == 1  # every key and field in one collective
