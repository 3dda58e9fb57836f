"""ACKTR with one joint K-FAC (actor and critic together) against two separate ones.

The two forms of ACKTR that trpo_lab used to ship, on the same seeds, presets and budgets:

``separate``  :class:`trpo_lab.agents.ACKTR`: one :class:`~trpo_lab.optim.KFAC` for the actor
              (trust region ``kl_clip``) and one for the critic (``vf_kl_clip``), gradient norms
              clipped per network.
``joint``     the form of the reference Atari code and of the former ``trpo_lab.sb3.ACKTR``:
              one KFAC over actor and critic, one KL clip ``kl_clip`` on their summed
              ``η² gᵀF̂⁻¹g``, one gradient-norm clip over all parameters.

Everything else is shared: the same Fisher pass (sampled actions, Gauss–Newton value noise),
the same loss, the preset's hyperparameters (``agents/acktr.toml``), the same rollout seeds.
Each run reports its final deterministic return (mean of ``--eval-episodes`` episodes, on
evaluation seeds that depend only on the run's seed) and its wall time; the summary gives,
per env and form, the mean over seeds ± the 95% Student-t half-width, and the paired
difference joint − separate.

Results are appended, one JSON line per finished run, to ``--out`` (so a long run can be
read while it goes), then summarised there and on stdout::

    nice python benchmarks/acktr_joint_vs_separate.py \\
        --envs CartPole-v1:100000 Pendulum-v1:200000 HalfCheetah-v5:200000 --seeds 0 1 2 \\
        --out benchmarks/results/acktr_joint_vs_separate.jsonl
    python benchmarks/acktr_joint_vs_separate.py --summarize benchmarks/results/acktr_joint_vs_separate.jsonl
    nice python benchmarks/acktr_joint_vs_separate.py --update-cost   # ms per update of each form
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from scipy import stats
from torch import Tensor, nn

from trpo_lab.agents.acktr import ACKTR
from trpo_lab.optim._flat import clip_grad_norm_
from trpo_lab.optim.kfac import KFAC
from trpo_lab.presets import load_preset

FORMS = ("separate", "joint")


class _JointModule(nn.Module):
    """Actor network, free log-std and critic: the parameters of the one joint KFAC."""

    def __init__(self, agent: ACKTR) -> None:
        super().__init__()
        self.actor = agent.policy.actor
        if agent.policy.log_std is not None:
            self.log_std = nn.ParameterList([agent.policy.log_std])
        self.critic = agent.policy.critic


class JointKFAC:
    """The joint form behind :class:`~trpo_lab.agents.acktr.ActorCriticKFAC`'s interface:
    one KFAC over actor and critic (``kl_clip`` on the sum), one gradient-norm clip over both."""

    def __init__(self, agent: ACKTR) -> None:
        cfg = agent.config
        self.kfac = KFAC(
            _JointModule(agent),
            lr=cfg.learning_rate,
            momentum=cfg.momentum,
            damping=cfg.damping,
            kl_clip=cfg.kl_clip,
            stat_decay=cfg.stat_decay,
            inverse_every=cfg.inverse_every,
            statistics_reducer=agent.reducer.weighted_means,
        )
        self.max_grad_norm = cfg.max_grad_norm
        self.last_grad_norms: dict[str, Tensor] = {}

    def set_lr(self, lr: float) -> None:
        self.kfac.param_groups[0]["lr"] = lr

    def track_statistics(self, hooks: bool = True) -> contextlib.AbstractContextManager[None]:
        return self.kfac.track_statistics(hooks=hooks)

    def record_statistics(self, module: nn.Module, inputs: Tensor, output_grads: Tensor) -> None:
        self.kfac.record_statistics(module, inputs, output_grads)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.kfac.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        norm = clip_grad_norm_(self.kfac.param_groups[0]["params"], self.max_grad_norm)
        self.kfac.step()
        self.last_grad_norms = {"actor": norm, "critic": norm}

    @property
    def last_stats(self) -> dict[str, float]:
        return {f"kfac/joint/{key.removeprefix('kfac/')}": value for key, value in self.kfac.last_stats.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"joint": self.kfac.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.kfac.load_state_dict(dict(state_dict["joint"]))


class JointACKTR(ACKTR):
    """ACKTR with the joint K-FAC; everything else (Fisher pass, loss, loop) is ACKTR's."""

    def _setup(self) -> None:
        super()._setup()
        self.optimizer = JointKFAC(self)  # type: ignore[assignment]


CLASSES: dict[str, type[ACKTR]] = {"separate": ACKTR, "joint": JointACKTR}


def run_one(form: str, env_id: str, steps: int, seed: int, eval_episodes: int) -> dict[str, Any]:
    """Train one agent from the preset and evaluate it deterministically."""
    hyperparameters, run = load_preset("acktr", env_id)
    agent = CLASSES[form](env_id, n_envs=int(run.get("n_envs", 8)), seed=seed, device="cpu", **hyperparameters)
    start = time.perf_counter()
    agent.learn(steps, tensorboard=False)
    wall = time.perf_counter() - start
    returns = agent.evaluate(eval_episodes, deterministic=True, seed=10_000 + seed)
    agent.close()
    return {
        "form": form,
        "env": env_id,
        "seed": seed,
        "steps": agent.num_timesteps,
        "final_return": float(returns.mean()),
        "wall_s": wall,
    }


def update_cost(env_id: str, blocks: int) -> str:
    """Median ms per update of both forms on one rollout batch, interleaved blocks of
    ``inverse_every`` updates (so each block holds one eigendecomposition), one thread."""
    hyperparameters, run = load_preset("acktr", env_id)
    kwargs: dict[str, Any] = {"n_envs": int(run.get("n_envs", 8)), "seed": 0, "device": "cpu", **hyperparameters}
    agents = {form: CLASSES[form](env_id, **kwargs) for form in FORMS}
    agents["separate"].collect_rollout()
    batch = agents["separate"].buffer.batch()
    block = agents["separate"].config.inverse_every
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    for repeat in range(blocks + 1):
        for form, agent in agents.items():
            start = time.perf_counter()
            for _ in range(block):
                agent.update(batch)
            if repeat:  # the first block warms up (factors, eigendecompositions, allocator)
                times[form].append((time.perf_counter() - start) / block)
    for agent in agents.values():
        agent.close()
    median = {form: statistics.median(t) for form, t in times.items()}
    return (
        f"update cost on {env_id} (batch {batch.size}, {blocks} blocks of {block}): "
        + ", ".join(f"{form} {1e3 * median[form]:.2f} ms" for form in FORMS)
        + f"; joint / separate = {median['joint'] / median['separate']:.2f}x"
    )


def _ci95(values: Sequence[float]) -> float:
    if len(values) < 2:
        return math.nan
    return float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def summarize(rows: list[dict[str, Any]]) -> str:
    """Per env: mean ± 95% CI of final return and wall time per form, and the paired difference."""
    lines = [
        "| env | form | seeds | final return (mean ± 95% CI) | wall s (mean) |",
        "|---|---|---|---|---|",
    ]
    envs = list(dict.fromkeys(row["env"] for row in rows))
    paired: list[str] = []
    for env_id in envs:
        by_form = {form: {r["seed"]: r for r in rows if r["env"] == env_id and r["form"] == form} for form in FORMS}
        for form in FORMS:
            runs = list(by_form[form].values())
            if not runs:
                continue
            ret = [r["final_return"] for r in runs]
            wall = [r["wall_s"] for r in runs]
            seeds = ",".join(str(s) for s in sorted(by_form[form]))
            lines.append(
                f"| {env_id} | {form} | {seeds} | {statistics.mean(ret):.1f} ± {_ci95(ret):.1f} | {statistics.mean(wall):.0f} |"
            )
        common = sorted(set(by_form["joint"]) & set(by_form["separate"]))
        if common:
            diff = [by_form["joint"][s]["final_return"] - by_form["separate"][s]["final_return"] for s in common]
            ratio = statistics.mean(by_form["joint"][s]["wall_s"] for s in common) / statistics.mean(
                by_form["separate"][s]["wall_s"] for s in common
            )
            paired.append(
                f"- {env_id}: joint − separate = {statistics.mean(diff):+.1f} ± {_ci95(diff):.1f} "
                f"(paired over seeds {common}); wall time joint / separate = {ratio:.2f}x"
            )
    return "\n".join([*lines, "", *paired])


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if "form" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--envs",
        nargs="+",
        default=["CartPole-v1:100000", "Pendulum-v1:200000", "HalfCheetah-v5:200000"],
        help="ENV:STEPS entries",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/acktr_joint_vs_separate.jsonl"))
    parser.add_argument("--summarize", type=Path, default=None, help="only print the summary of a results file")
    parser.add_argument("--update-cost", action="store_true", help="only time one update of each form per env")
    parser.add_argument("--blocks", type=int, default=10, help="timed blocks per form for --update-cost")
    args = parser.parse_args()
    if args.summarize is not None:
        print(summarize(_read(args.summarize)))
        return
    torch.set_num_threads(args.threads)
    if args.update_cost:
        for entry in args.envs:
            print(update_cost(entry.rpartition(":")[0], args.blocks), flush=True)
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    header = {"header": True, "commit": commit, "argv": vars(args) | {"out": str(args.out)}, "torch": torch.__version__,
              "machine": platform.platform(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with args.out.open("a") as fh:
        fh.write(json.dumps(header, default=str) + "\n")
    for entry in args.envs:
        env_id, _, steps = entry.rpartition(":")
        for seed in args.seeds:
            for form in args.forms:  # interleaved, so a partial file still compares like with like
                row = run_one(form, env_id, int(steps), seed, args.eval_episodes)
                print(json.dumps(row), flush=True)
                with args.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(summarize(_read(args.out)))


if __name__ == "__main__":
    import sys

    sys.path.append(sys.path.pop(0))  # this folder last: its mujoco.py must not shadow the mujoco package
    main()
