"""The weight-decay term s of every fused block a host model's forward ran.

A host model (a transformer layer, a timm block) calls ``self.mlp(x)`` and takes one
tensor back, so ``return_penalty=True`` cannot reach the loss. Run the forward inside
``collect_penalty()`` instead: every ``FusedMLP`` with ``weight_decay > 0`` that runs
in it computes its s in the same fused call and adds it to the collector::

    with mlp_ext.collect_penalty() as penalty:
        logits = model(x)                 # the host calls its fused blocks itself
    loss = F.cross_entropy(logits, y) + penalty.total()   # J = L + sum of s
    loss.backward()

or, in one call, ``logits, s = mlp_ext.forward_with_penalty(model, x)``.

* Each block's s is counted once per call: a block that ran twice counts twice (as
  its weights entered the forward twice), a block that did not run counts zero.
* ``total()`` is differentiable: gradients of J = L + sum s, weight decay included,
  exactly as ``return_penalty=True`` gives them for one block.
* torch.compile(fullgraph=True): compile the model (or a function that calls it
  inside the ``with``); the blocks' appends to the collector are traced as side
  effects and replayed.
* DDP: wrap the model as usual and run the DDP module's forward inside the ``with``;
  s depends on the same parameters, so its gradient is all-reduced with the rest.
* Gradient accumulation: one ``with`` per micro-batch; each micro-batch's loss gets
  the s of its own forward (scale it like the rest of that loss).
* Activation checkpointing recomputes blocks during backward: read ``total()``
  before backward (the ``with`` should enclose the forward only).
* Nested collectors: a block adds its s to the innermost one.
* ``mlp(x, return_penalty=True)`` inside a collector returns s and collects it too:
  add one of them to the loss, not both.
"""
import contextlib
from typing import Iterator, List, Optional

import torch
from torch import Tensor

# The collectors open now, innermost last. A plain list: torch.compile reads it and
# traces the appends to a collector's terms as side effects.
_ACTIVE: List["PenaltyCollector"] = []


class PenaltyCollector:
    """The s terms of the fused blocks that ran inside ``collect_penalty()``."""

    def __init__(self) -> None:
        self.terms: List[Tensor] = []

    def add(self, s: Tensor) -> None:
        self.terms.append(s)

    def total(self) -> Tensor:
        """The sum of the collected s (a 0-dim tensor; 0.0 when nothing was collected)."""
        if not self.terms:
            return torch.zeros(())
        total = self.terms[0]
        for s in self.terms[1:]:
            total = total + s
        return total

    def __len__(self) -> int:
        return len(self.terms)


def current_collector() -> Optional[PenaltyCollector]:
    """The innermost open collector, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def collect_penalty() -> Iterator[PenaltyCollector]:
    """Collect the s of every FusedMLP with weight_decay > 0 run inside the block."""
    collector = PenaltyCollector()
    _ACTIVE.append(collector)
    try:
        yield collector
    finally:
        _ACTIVE.remove(collector)


def forward_with_penalty(model, *args, **kwargs):
    """(model(*args, **kwargs), the sum of s of the fused blocks that forward ran)."""
    with collect_penalty() as penalty:
        out = model(*args, **kwargs)
    return out, penalty.total()
