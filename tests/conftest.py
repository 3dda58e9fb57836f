"""Suite-wide settings: one torch thread (small networks run faster, and CI has 2 cores)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
