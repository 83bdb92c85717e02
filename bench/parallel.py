"""Data parallelism for one run across processes (``accelerate launch --num_processes N run_bench.py ...``).

Every process loads the model and trains each run together with the others: each takes its slice of
the global batch (the batch size is the global batch), gradients are averaged by DDP, and the loss
is weighted by label tokens so that the update is the one a single process makes on the whole batch
(within floating-point rounding; LoRA dropout draws different masks, so runs with dropout agree in
distribution only). Process 0 leads: it alone talks to the study and the results store, evaluates
and writes; the others follow the jobs it broadcasts and stop when it says so. Pruning decisions made
at validation checkpoints are broadcast too, so every process stops a run at the same step.
"""

from __future__ import annotations

import torch


class Group:
    """This process's place among the data-parallel processes of one launch."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.size = accelerator.num_processes
        self.rank = accelerator.process_index

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, obj=None):
        """The leader's ``obj`` on every process."""
        if not self.parallel:
            return obj
        box = [obj if self.leader else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, indices: list[int]) -> list[int]:
        """This process's contiguous slice of a global batch (the batch size divides evenly: checked at start)."""
        if not self.parallel:
            return indices
        per = len(indices) // self.size
        return indices[self.rank * per:(self.rank + 1) * per]

    def total(self, value: float | int) -> float:
        """The sum of ``value`` over the processes."""
        if not self.parallel:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum").item())
