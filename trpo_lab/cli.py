"""Command line: ``trpo-lab train | compare | eval | tune | export`` (also ``python -m trpo_lab``).

Mistakes of the user (unknown algorithm or env, bad ``--set`` key or value, missing
run directory, unreadable experiment file) exit with status 2 and one line on stderr,
never a traceback.

Data-parallel training: under ``torchrun`` (``WORLD_SIZE`` > 1) ``train`` joins the process
group and trains one rank; ``train ... --nproc N`` is the shortcut that launches
``python -m torch.distributed.run --standalone --nproc-per-node N -m trpo_lab train ...`` on
this machine. A failed, hung or drifted rank stops the others with one line and status 1.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "build_parser", "CLIError"]


class CLIError(Exception):
    """A user mistake: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trpo-lab", description="Trust-region and natural-gradient RL: train, compare, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one agent on one environment")
    train.add_argument("algo", nargs="?", help="trpo, npg, acktr or ppo")
    train.add_argument("env", nargs="?", help="Gymnasium environment id, e.g. CartPole-v1")
    train.add_argument("--steps", type=int, default=None, help="total environment steps (default: preset or 100000)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--n-envs", type=int, default=None, help="parallel environments (default: preset or 8)")
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    train.add_argument("--run-dir", default=None, help="output folder (default: runs/ENV-ALGO-seedS)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a hyperparameter (TOML value syntax; dotted keys for policy_kwargs); "
                            "with --resume, only those a resumed run can change")
    train.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run from its checkpoint.pt")
    train.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="memory the agent may use, e.g. 8GB (default: what the device has available); "
                            "checked before allocating")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train data-parallel in N processes on this machine (launches torchrun); "
                            "each runs --n-envs environments")
    train.add_argument("--dist-timeout", type=float, default=120.0, metavar="SECONDS",
                       help="data-parallel: how long a rank waits for the others before failing (default 120)")
    train.add_argument("--sync-check-every", type=int, default=10, metavar="K",
                       help="data-parallel: updates between checks that the ranks' parameters agree (default 10)")

    compare = sub.add_parser(
        "compare", help="train a grid of algorithms x environments x seeds in parallel and compare them"
    )
    compare.add_argument("experiment", nargs="?", default=None,
                         help="experiment TOML file, or a name in experiments/ (default: the built-in 'default')")
    compare.add_argument("--algos", default=None, help="comma-separated algorithms, replacing the spec's")
    compare.add_argument("--envs", default=None, help="comma-separated environment ids, replacing the spec's")
    compare.add_argument("--seeds", default=None, metavar="N|A-B,C",
                         help="seeds: a count N (0..N-1), or a comma-separated list of seeds and ranges "
                              "replacing the spec's, e.g. 10-15 or 12,14 (one seed: 15-15)")
    compare.add_argument("--steps", type=int, default=None, help="budget per run for every environment")
    compare.add_argument("--out", default=None, help="output folder (default: compare_out/EXPERIMENT)")
    compare.add_argument("--workers", type=int, default=None, help="worker processes (default: spec, else CPU count)")
    compare.add_argument("--eval-episodes", type=int, default=None, help="evaluation episodes per final agent")
    compare.add_argument("--executor", choices=("local", "ray"), default="local",
                         help="local worker processes (default) or Ray tasks (pip install 'trpo-lab[ray]')")
    compare.add_argument("--ray-address", default=None, metavar="ADDR",
                         help="Ray cluster to run on (e.g. auto, ray://head:10001); default: a local Ray instance")
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="[NAME.]KEY=VALUE",
                         help="override a hyperparameter of every algorithm that has it, or of one algorithm "
                              "or variant (trpo.target_kl=0.02); TOML value syntax")
    compare.add_argument("--quiet", action="store_true", help="no progress display")

    ev = sub.add_parser("eval", help="evaluate a trained run")
    ev.add_argument("run_dir")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--stochastic", action="store_true", help="sample actions instead of the mode")
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--video", metavar="DIR", default=None,
                    help="record every evaluation episode as an mp4 in DIR (pip install 'trpo-lab[video]')")

    tune = sub.add_parser("tune", help="search hyperparameters with Optuna (TPE sampler, median pruner)")
    tune.add_argument("algo", help="trpo, npg, acktr or ppo")
    tune.add_argument("env", help="Gymnasium environment id, e.g. CartPole-v1")
    tune.add_argument("--trials", type=int, default=20, help="trials to run now, over all workers (default 20)")
    tune.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    tune.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                      help="start no trial after this many seconds (running ones finish)")
    tune.add_argument("--steps", type=int, default=None, help="environment steps per trial (default: the preset's budget)")
    tune.add_argument("--n-envs", type=int, default=None, help="environments per trial (default: the preset's)")
    tune.add_argument("--seed", type=int, default=0, help="seed of every trial's agent and of the sampler")
    tune.add_argument("--storage", default=None, metavar="URL",
                      help="Optuna storage: an RDB URL (sqlite:///study.db, postgresql://...) shared by several "
                           "machines, or a journal file (.journal/.log); default OUT/study.journal")
    tune.add_argument("--study", default=None, metavar="NAME", help="study name (default ALGO-ENV)")
    tune.add_argument("--out", default=None, help="output folder (default tune_out/ENV-ALGO)")
    tune.add_argument("--space", default=None, metavar="FILE",
                      help="search-space TOML (default agents/tune/ALGO.toml, else the built-in one)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="fix a hyperparameter over the preset for every trial")
    tune.add_argument("--evaluations", type=int, default=5, help="evaluations per trial, reported to the pruner (default 5)")
    tune.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation (default 5)")
    tune.add_argument("--quiet", action="store_true", help="no line per trial")

    export = sub.add_parser("export", help="export a run's deterministic policy (ONNX)")
    export.add_argument("run_dir")
    export.add_argument("--onnx", metavar="FILE", required=True,
                        help="the .onnx file to write: raw observations in, predict()'s actions out "
                             "(pip install 'trpo-lab[export]')")
    return parser


def _unique_run_dir(base: Path) -> Path:
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}_{i}").exists():
        i += 1
    return Path(f"{base}_{i}")


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CLIError(f"Invalid WORLD_SIZE: {os.environ['WORLD_SIZE']!r}; expected an integer") from None


def _train(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    if args.threads < 1:
        raise CLIError(f"Invalid --threads: {args.threads}; expected >= 1")
    if args.sync_check_every < 1:
        raise CLIError(f"Invalid --sync-check-every: {args.sync_check_every}; expected >= 1")
    if not args.dist_timeout > 0:
        raise CLIError(f"Invalid --dist-timeout: {args.dist_timeout}; expected a positive number of seconds")
    if args.nproc is not None:
        if args.nproc < 1:
            raise CLIError(f"Invalid --nproc: {args.nproc}; expected >= 1")
        if _world_size() > 1:
            raise CLIError("--nproc launches the processes itself; leave it out when running under torchrun")
    torch.set_num_threads(args.threads)
    if args.nproc is not None and args.nproc > 1:
        return _launch(args, argv)
    if _world_size() > 1:
        return _train_rank(args)
    if args.resume is not None:
        if args.max_memory is not None:  # the checkpoint's settings are used as they are
            raise CLIError("--max-memory applies to new runs; a resumed run keeps its checkpoint's max_memory")
        return _resume(args)
    agent, steps, run_dir = _build_agent(args)
    return _run(agent, steps, run_dir, args.quiet)


def _set_options(options: Sequence[str]) -> dict[str, Any]:
    """The ``--set key=value`` options as a (nested, for dotted keys) dict."""
    from trpo_lab.config import parse_set_option

    values: dict[str, Any] = {}
    for option in options:
        parse_set_option(option, values)
    return values


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """Validated ``(hyperparameters, run settings, n_envs, steps)`` of ``train ALGO ENV``."""
    from trpo_lab.config import config_class
    from trpo_lab.envs import check_env_id
    from trpo_lab.experiments import DEFAULT_TIMESTEPS
    from trpo_lab.presets import agent_settings

    if not args.algo or not args.env:
        raise CLIError("trpo-lab train: ALGO and ENV are required (or --resume RUN_DIR)")
    config_class(args.algo)  # unknown algorithm -> ValueError
    check_env_id(args.env)
    overrides = _set_options(args.overrides)
    if args.max_memory is not None:
        overrides["max_memory"] = args.max_memory
    hyperparameters, run_settings = agent_settings(args.algo, args.env, overrides)
    n_envs = args.n_envs if args.n_envs is not None else int(run_settings.get("n_envs", 8))
    steps = args.steps if args.steps is not None else int(run_settings.get("total_timesteps", DEFAULT_TIMESTEPS))
    if steps < 1:
        raise CLIError(f"Invalid --steps: {steps}; expected >= 1")
    return hyperparameters, run_settings, n_envs, steps


def _check_budget(algo: str, hyperparameters: dict[str, Any], n_envs: int, steps: int, world_size: int = 1) -> str | None:
    """Before any environment is built: refuse more environments than steps; return the warning
    for a budget less than one rollout (what will run), or ``None``."""
    from trpo_lab.config import config_class
    from trpo_lab.resources import rollout_budget_note
    from trpo_lab.validation import check_int

    check_int("n_envs", n_envs, minimum=1)
    n_steps = config_class(algo).from_dict(hyperparameters).n_steps
    if n_envs * world_size > steps and world_size > 1:
        raise CLIError(f"Invalid n_envs: {n_envs} per process x {world_size} processes = {n_envs * world_size} "
                       f"environments; expected at most the {steps} steps of the budget (--steps)")
    return rollout_budget_note(steps, n_envs * world_size, n_steps)


def _default_run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    return _unique_run_dir(Path("runs") / f"{args.env}-{args.algo.lower()}-seed{args.seed}")


def _build_agent(args: argparse.Namespace, dist: Any = None, device: Any = None) -> tuple[Any, int, Path]:
    from trpo_lab.agents import agent_class
    from trpo_lab.validation import check_device

    hyperparameters, run_settings, n_envs, steps = _settings(args)
    check_device(args.device if device is None else device)
    # every rank checks before building anything (an error stops them all alike); rank 0 warns
    # once the agent is built, so that a later error is still the only line
    note = _check_budget(args.algo, hyperparameters, n_envs, steps, 1 if dist is None else dist.world_size)
    run_dir = _default_run_dir(args) if dist is None else Path(dist.run_on_main(lambda: str(_default_run_dir(args))))
    agent = agent_class(args.algo)(
        args.env,
        n_envs=n_envs,
        seed=args.seed,
        device=args.device if device is None else device,
        vectorization=str(run_settings.get("vectorization", "sync")),
        dist=dist,
        **hyperparameters,
    )
    if note is not None and (dist is None or dist.is_main):
        print(f"trpo-lab: warning: {note}", file=sys.stderr)
    return agent, steps, run_dir


def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``train ... --nproc N``: check the arguments here, then run the same command under torchrun.

    torchrun runs in its own session, so Ctrl-C reaches the ranks once, through torchrun (this
    process forwards SIGINT and SIGTERM): they finish the update, checkpoint and stop.
    """
    from trpo_lab.config import config_class
    from trpo_lab.validation import check_device

    rest = _without_option(list(argv), "--nproc")
    if args.resume is None:
        hyperparameters, _, n_envs, steps = _settings(args)
        config_class(args.algo).from_dict(hyperparameters)
        if n_envs < 1:
            raise CLIError(f"Invalid n_envs: {n_envs}; expected >= 1")
        _check_budget(args.algo, hyperparameters, n_envs, steps, args.nproc)  # errors here, once; rank 0 warns
        if not args.run_dir:  # every rank must write (rank 0) and checkpoint into the same folder
            rest += ["--run-dir", str(_default_run_dir(args))]
    elif not Path(args.resume).is_dir():
        raise CLIError(f"Run directory not found: {args.resume}")
    check_device(args.device)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "trpo_lab", *rest]
    process = subprocess.Popen(command, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = process.wait()
        # torchrun exits 1 after a signal; report it as a single process would (130 / 143)
        return 128 + received[0] if received else status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def _train_rank(args: argparse.Namespace) -> int:
    """One rank of a data-parallel run launched by torchrun (``WORLD_SIZE`` > 1)."""
    from trpo_lab.distributed import init_distributed
    from trpo_lab.validation import check_device

    device = check_device(args.device)
    ctx = init_distributed(
        "nccl" if device.type == "cuda" else "gloo", timeout_s=args.dist_timeout, check_every=args.sync_check_every
    )
    assert ctx is not None
    if device.type == "cuda":
        device = ctx.device  # cuda:LOCAL_RANK
    if args.resume is not None:
        from trpo_lab.experiments import resume_run

        run_dir = Path(args.resume)
        agent, steps = resume_run(run_dir, device=str(device), dist=ctx, overrides=_set_options(args.overrides))
        if args.steps is not None:
            steps = args.steps
        if agent.num_timesteps >= steps:
            agent.close()
            if ctx.is_main:
                print(f"{run_dir}: already trained for {agent.num_timesteps} of {steps} steps; nothing to do")
            ctx.close()
            return 0
    else:
        agent, steps, run_dir = _build_agent(args, dist=ctx, device=device)
    status = _run(agent, steps, run_dir, args.quiet or not ctx.is_main, report=ctx.is_main)
    ctx.close()
    return status


def _resume(args: argparse.Namespace) -> int:
    from trpo_lab.experiments import resume_run

    run_dir = Path(args.resume)
    agent, steps = resume_run(run_dir, device=args.device, overrides=_set_options(args.overrides))
    if args.steps is not None:
        steps = args.steps
    if agent.num_timesteps >= steps:
        agent.close()
        print(f"{run_dir}: already trained for {agent.num_timesteps} of {steps} steps; nothing to do")
        return 0
    return _run(agent, steps, run_dir, args.quiet)


def _comma_list(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CLIError(f"Invalid {option}: {text!r}; expected a comma-separated list")
    return items


def _seed_option(text: str | None) -> int | list[int] | None:
    """``compare --seeds``: a count ``N`` (seeds 0..N-1), or seeds and ranges ``A-B`` (both ends
    included) separated by commas, in the order given."""
    if text is None:
        return None
    expected = "a count N >= 1 (seeds 0..N-1), or seeds and ranges such as 10-15 or 12,14 (one seed: 15-15)"
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        if int(text) < 1:
            raise CLIError(f"Invalid --seeds: {text!r}; expected {expected}")
        return int(text)
    seeds: list[int] = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if match is None or (match.group(2) is not None and int(match.group(2)) < int(match.group(1))):
            raise CLIError(f"Invalid --seeds: {text!r}; expected {expected}")
        first = int(match.group(1))
        seeds += range(first, int(match.group(2) if match.group(2) is not None else first) + 1)
    if len(set(seeds)) != len(seeds):
        raise CLIError(f"Invalid --seeds: {text!r}; a seed is given twice")
    return seeds


def _compare(args: argparse.Namespace) -> int:
    from trpo_lab.experiments import load_experiment, run_experiment

    for option, value in (("--workers", args.workers), ("--steps", args.steps),
                          ("--eval-episodes", args.eval_episodes)):
        if value is not None and value < 1:
            raise CLIError(f"Invalid {option}: {value}; expected >= 1")
    experiment = load_experiment(args.experiment).with_overrides(
        algos=_comma_list(args.algos, "--algos"),
        envs=_comma_list(args.envs, "--envs"),
        seeds=_seed_option(args.seeds),
        steps=args.steps,
        eval_episodes=args.eval_episodes,
        hyperparameters=_set_options(args.overrides),
    )
    out = Path(args.out) if args.out else Path("compare_out") / experiment.name
    if args.ray_address is not None and args.executor != "ray":
        raise CLIError("--ray-address needs --executor ray")
    result = run_experiment(experiment, out, workers=args.workers, progress=not args.quiet,
                            executor=args.executor, ray_address=args.ray_address)
    print(result.report)
    print(f"compare {experiment.name}: {len(result.records)} runs reported, {len(result.skipped)} skipped as finished, "
          f"{len(result.failures)} failed, {result.elapsed_s:,.0f} s; see {out / 'report.md'}")
    return 1 if result.failures else 0


def _run(agent: Any, steps: int, run_dir: Path, quiet: bool, report: bool = True) -> int:
    try:
        agent.learn(steps, run_dir=run_dir, progress_bar=not quiet)
    finally:
        agent.close()
    if report:
        returns = list(agent.episode_returns)
        summary = f"mean return (last {len(returns)} episodes) {sum(returns) / len(returns):.2f}" if returns else ""
        print(f"{agent.algo} on {agent.env_id}: {agent.num_timesteps} steps, {summary}; run directory {run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from trpo_lab.agents.base import OnPolicyAgent

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CLIError(f"Run directory not found: {run_dir}")
    if args.episodes < 1:
        raise CLIError(f"Invalid --episodes: {args.episodes}; expected >= 1")
    if args.video is not None:
        from trpo_lab.envs.video import check_video_support

        check_video_support()
    path = _agent_file(run_dir)
    agent = OnPolicyAgent.load(path, n_envs=1)
    try:
        returns = agent.evaluate(args.episodes, deterministic=not args.stochastic, seed=args.seed,
                                 video_folder=args.video)
    finally:
        agent.close()
    print(
        f"{agent.algo} on {agent.env_id}: return {np.mean(returns):.2f} +- {np.std(returns):.2f} "
        f"over {len(returns)} episodes ({path.name})"
    )
    if args.video is not None:
        videos = sorted(Path(args.video).glob(f"{agent.algo}-{agent.env_id}-episode-*.mp4"))
        print(f"recorded {len(videos)} episode video(s) in {args.video}")
    return 0


def _agent_file(run_dir: Path) -> Path:
    """``final.pt`` of a run directory, else its latest ``checkpoint.pt``."""
    for name in ("final.pt", "checkpoint.pt"):
        if (run_dir / name).exists():
            return run_dir / name
    raise CLIError(f"No final.pt or checkpoint.pt in {run_dir}; is it a run directory?")


def _tune(args: argparse.Namespace) -> int:
    from trpo_lab.config import parse_set_option
    from trpo_lab.experiments.tune import tune

    overrides: dict[str, Any] = {}
    for option in args.overrides:
        parse_set_option(option, overrides)
    result = tune(
        args.algo, args.env, trials=args.trials, workers=args.workers, timeout=args.timeout, steps=args.steps,
        n_envs=args.n_envs, seed=args.seed, storage=args.storage, study_name=args.study, out=args.out,
        space=args.space, overrides=overrides, evaluations=args.evaluations, eval_episodes=args.eval_episodes,
        verbose=not args.quiet,
    )
    summary = (f"study {result.study_name!r}: {result.n_trials} trials ({result.new_trials} new; {result.n_complete} "
               f"complete, {result.n_pruned} pruned, {result.n_failed} failed) in {result.elapsed_s:,.0f} s")
    if result.best_value is None:
        print(f"{summary}; no trial completed yet, so no best.toml; see {result.plot_path}")
        return 0
    print(result.preset_toml, end="")
    print(f"{summary}; best trial {result.best_trial}: return {result.best_value:.2f}; "
          f"preset in {result.preset_path}, history in {result.plot_path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trpo_lab.agents.base import OnPolicyAgent
    from trpo_lab.export import export_onnx

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise CLIError(f"Run directory not found: {run_dir}")
    path = _agent_file(run_dir)
    agent = OnPolicyAgent.load(path, n_envs=1)
    try:
        written = export_onnx(agent, args.onnx)
    finally:
        agent.close()
    print(f"{agent.algo} on {agent.env_id} ({path.name}, {agent.num_timesteps} steps): deterministic policy "
          f"written to {written} (input 'obs', output 'action')")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trpo-lab`` console script."""
    status = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist_is_initialized_once():
        # A torchrun rank: gloo's threads can abort the interpreter's teardown ("terminate
        # called without an active exception") after a clean run; everything is written and
        # closed by now, so leave without running C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def dist_is_initialized_once() -> bool:
    """Whether this process joined a torch.distributed process group (now possibly left)."""
    from trpo_lab import distributed

    return distributed.joined_process_group()


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """Warnings (a repaired progress.csv, a resume without env state...) as one line each, like errors."""
    text = str(message).strip().splitlines()
    print(f"trpo-lab: warning: {text[0] if text else category.__name__}", file=sys.stderr if file is None else file)


def _main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run_command(argv)


def _run_command(argv: Sequence[str] | None = None) -> int:
    from trpo_lab.agents.base import NonFiniteError
    from trpo_lab.distributed import RankDriftError, RankFailedError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return _train(args, argv)
        if args.command == "compare":
            return _compare(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "export":
            return _export(args)
        raise CLIError(f"trpo-lab: unknown command {args.command!r}")
    except (CLIError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not message.startswith("trpo-lab"):
            message = f"trpo-lab: error: {message}"
        print(message, file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"trpo-lab: error: {exc}", file=sys.stderr)
        return 1
    except (RankFailedError, RankDriftError) as exc:
        print(f"trpo-lab: error: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # A broken process group can abort in its destructor at interpreter exit, burying the
        # line above under a C++ trace; the checkpoints are already on disk.
        os._exit(1)
    except KeyboardInterrupt as exc:  # TrainingInterrupted says which signal and where the checkpoint is
        print(f"trpo-lab: interrupted{f': {exc}' if str(exc) else ''}", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)
