"""DataParallel in one process: the loop's bookkeeping is the local computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trpo_lab.distributed import DataParallel, Reducer


def test_one_process_logs_local_statistics_and_counts() -> None:
    reducer = Reducer()
    reducer.share_batch_sizes(120)
    helper = DataParallel(None, reducer)
    metrics, rollout, counts = helper.logged_metrics({"train/kl": 0.25}, 128, [1.0, 3.0], [10.0, 20.0], 2, 1)
    assert metrics == {"train/kl": 0.25}
    assert rollout["rollout/return_mean"] == 2.0
    assert rollout["rollout/return_std"] == pytest.approx(float(np.std([1.0, 3.0])))
    assert rollout["rollout/length_mean"] == 15.0
    assert (counts.steps, counts.episodes, counts.skipped) == (128, 2, 1)
    _, empty, _ = helper.logged_metrics({}, 1, [], [], 0, 0)
    assert all(math.isnan(v) for v in empty.values())


def test_one_process_stop_agreement_join_and_sync_are_local() -> None:
    helper = DataParallel(None, Reducer())
    assert helper.is_main and helper.world_size == 1
    assert helper.agree_to_stop(15, False) == (15, False)
    assert helper.agree_to_stop(None, True) == (None, True)
    helper.join(torch.nn.Linear(2, 2), {}, torch.device("cpu"))  # nothing to broadcast
    helper.check_in_sync(torch.nn.Linear(2, 2), 10)
    assert helper.gather_local_states({"a": 1}) is None
    assert helper.run_on_main(lambda: 7) == 7


def test_an_empty_batch_is_refused_with_the_setting_to_change() -> None:
    helper = DataParallel(None, Reducer())
    with pytest.raises(ValueError, match=r"Invalid n_steps: 4; rank\(s\) \[0\] collected no valid transition"):
        helper.share_batch_sizes(0, 4, 1)
