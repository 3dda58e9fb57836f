"""Data-parallel training: the process-group context (torchrun) and the Reducer the agents call.

Algorithms never branch on whether they run data-parallel: they call
:class:`~trpo_lab.distributed.reducer.Reducer` methods, which are the identity (or the
local computation) in one process and torch.distributed collectives under torchrun.
"""

from trpo_lab.distributed.context import *  # noqa: F403
from trpo_lab.distributed.context import __all__ as _context_all
from trpo_lab.distributed.data_parallel import DataParallel
from trpo_lab.distributed.reducer import Reducer

__all__ = [*_context_all, "DataParallel", "Reducer"]
