"""The whole training step as a CUDA graph (train.cuda_graphs): forward, backward, every optimizer's
update, the non-finite guard, BatchNorm's restore and the weight average, replayed by one launch.

On an H200 the default model's step at batch 64 took 6.8 ms, bound by kernel launches and the Python
issuing them (benchmarks/results/train_throughput_h200.json). A step object's `run` (steps/base.py)
only queues device work: the KL weight and the learning rates are device tensors filled before it,
a skipped step is masked on the device (optimizers.py), and nothing is read on the host; so it can
be captured as PyTorch's "whole-network capture" describes (torch.cuda.graphs; docs "CUDA Graphs"):
warm-up steps on a side stream, then capture, then `replay()` with each batch copied into the
graph's static input.

- One graph per batch shape and per value of the step's `phase` (the ldm step's discriminator
  phase): the last partial batch of an epoch and the steps after disc_start get graphs of their own.
- Warm-up steps really train; the state they touch (weights, buffers, optimizer state, the weight
  average, the objective's statistics, the RNG) is put back before capture, so that a graphed run
  takes the same steps as an eager one.
- Random numbers (the reparametrisation noise) come from the default CUDA generator, which
  torch.cuda.graph registers: each replay draws fresh numbers and advances the generator as the
  eager step would.
- Graphs are captured at the first step of each kind, after the trainer loaded any checkpoint;
  loading state afterwards (which replaces optimizer state tensors) needs `clear()`.
- Under torchrun it is off: DistributedDataParallel builds its gradient buckets during the first
  steps and the step's all-reduce would have to be captured with them (runtime.use_cuda_graphs).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor

from image_autoencoding.training.steps.base import StepResult, TrainingStep

WARMUP_STEPS = 3  # the PyTorch docs' example; lazily built state (optimizer moments, cuBLAS handles) exists after


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: Tensor  # the static input: each batch is copied into it
    result: StepResult  # the static outputs, overwritten by each replay


class GraphedStep:
    """Called as the step object is (steps/base.TrainingStep.__call__), with the same result."""

    def __init__(self, step: TrainingStep):
        self.step = step
        self._graphs: dict[Hashable, _Captured] = {}

    def __call__(self, x: Tensor, alpha: float, step: int, flags: Tensor | None = None) -> StepResult:
        if flags is not None:
            raise ValueError("CUDA graphs are not used under torchrun")
        key = (tuple(x.shape), x.dtype, self.step.prepare(alpha, step))
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(x)
        captured.x.copy_(x, non_blocking=True)
        captured.graph.replay()
        return captured.result

    def clear(self) -> None:
        """Forget every graph (after state was loaded into the step)."""
        self._graphs.clear()

    def _capture(self, x: Tensor) -> _Captured:
        static_x = x.clone()
        saved = _State(self.step)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step.run(static_x)
        torch.cuda.current_stream().wait_stream(side)
        saved.restore()
        graph = torch.cuda.CUDAGraph()
        for optimizer in self.step.optimizers.values():
            optimizer.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's pool
        with torch.cuda.graph(graph):
            result = self.step.run(static_x)
        return _Captured(graph, static_x, result)


class _State:
    """A copy of every tensor a step changes, to undo the warm-up steps. Tensors are copied back
    into place (a graph records addresses); optimizer state the warm-up created is zeroed, which is
    its initial value for Adam and RMSprop (step 0, moments 0). The CUDA RNG state is restored."""

    def __init__(self, step: TrainingStep):
        self.step = step
        self.tensors = {id(t): (t, t.detach().clone()) for t in _changed_by(step)}
        self.rng = torch.cuda.get_rng_state()

    @torch.no_grad()
    def restore(self) -> None:
        for tensor in _changed_by(self.step):
            kept = self.tensors.get(id(tensor))
            if kept is None:
                tensor.zero_()
            else:
                tensor.copy_(kept[1])
        torch.cuda.set_rng_state(self.rng)


def _changed_by(step: TrainingStep) -> list[Tensor]:
    tensors = [t for network in step.networks.values() for t in (*network.parameters(), *network.buffers())]
    for optimizer in step.optimizers.values():
        tensors += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, Tensor)]
    if step.ema is not None:
        tensors += [*step.ema.average.parameters(), *step.ema.average.buffers()]
        tensors += [t for t in vars(step.ema).values() if isinstance(t, Tensor)]  # its count of updates
    if step.terms is not None:  # the objective's own terms (steps/base.TermSums)
        tensors.append(step.terms.sums)
    tensors += [t for t in vars(step).values() if isinstance(t, Tensor)]  # such as the KL weight
    return tensors
