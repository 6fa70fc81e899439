"""One training step on a batch: forward, backward, the global gradient norm, clipping and AdamW, either
run op by op from Python (eagerly) or, on a GPU, replayed as two CUDA graphs (minimoe.graphs).

Replayed, a step costs the host two graph launches and a few small copies instead of several hundred
kernel launches from Python, so the GPU never waits for the interpreter. Shapes must be the same at
every step (the batch's, and the MoE layers' capacities: dropless routing reads the fullest expert's
load on the host and cannot be captured).

Why two graphs and not one: the update kernels read device tables of the gradients' addresses
(cuda/adamw.py). The gradients are allocated by the first capture (forward and backward); the tables of
their addresses are uploaded after it; the second capture (norm, clipping, AdamW) records launches that
read them. Every replay of the first graph rewrites the gradients where the capture put them, so the
tables stay true.

What changes from step to step is written into device memory before the launches: the batch (into the
graph's input arrays), the learning rate and bias corrections (AdamW.advance), the random generator's
key (backend.manual_seed, which the caller runs before each step, as the training loop does). The
draws' counters are those of the capture, which starts from the counter the first step found (0 after
a reseeding): a replayed step draws the numbers an eager step would.

A step whose loss or gradient norm is not finite must leave the weights as they were. The host reads
both only after the step, so clip_scale turns them into a NaN scale, which the update kernel obeys by
writing nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minimoe import backend, breakdown
from minimoe.graphs import Graph
from minimoe.model import GPT, ModelOutput
from minimoe.moe.gate import Routing
from minimoe.optim import AdamW, clip_scale


@dataclass
class StepOutput:
    """A step's numbers, as 0-d arrays on the model's device (reading one waits for the step)."""

    loss: Any  # what the gradients are of: lm_loss + the MoE layers' auxiliary losses
    lm_loss: Any  # the mean next-token cross-entropy
    grad_norm: Any  # the global gradient norm before clipping
    moe: list[Routing]  # each MoE layer's routing of the batch


class TrainStep:
    """`step(inputs, targets)` trains `model` by one optimizer step on that batch. graphs=True (a GPU
    only) captures the step on its first call and replays it afterwards; the optimizer's state must not
    be replaced (a checkpoint loaded) after that first call."""

    def __init__(self, model: GPT, optimizer: AdamW, grad_clip: float, graphs: bool = False):
        if graphs and backend.device() != "cuda":
            raise ValueError(f"a training step runs as CUDA graphs on a GPU only; the device is {backend.device()}")
        self.model, self.optimizer, self.grad_clip, self.graphs = model, optimizer, grad_clip, graphs
        self.captured: CapturedStep | None = None

    def __call__(self, inputs: Any, targets: Any) -> StepOutput:
        if not self.graphs:
            output = self.forward_backward(inputs, targets)
            grad_norm = self.update(output, advance=True)
            self.model.zero_grad()  # the gradients' memory is free for the next forward
            return _step_output(output, grad_norm)
        if self.captured is None:
            self.captured = CapturedStep(self, inputs, targets)
        return self.captured.run(inputs, targets)

    def forward_backward(self, inputs: Any, targets: Any) -> ModelOutput:
        output = self.model(inputs, targets)
        output.loss.backward()
        return output

    def update(self, output: ModelOutput, advance: bool = False, refused: bool = False) -> Any:
        """Norm, clipping and AdamW from the gradients the parameters hold; returns the norm. advance:
        count the step first (eagerly; a graph's replays are counted before their launch). refused: the
        update with a NaN scale, which writes nothing (a graph's warm-up)."""
        with breakdown.timed("optimizer", "update"):
            if advance:
                self.optimizer.advance()
            grad_norm = self.optimizer.grad_norm()
            scale = clip_scale(grad_norm, self.grad_clip, output.loss.data)
            self.optimizer.update(scale * float("nan") if refused else scale)
        return grad_norm


class CapturedStep:
    """A TrainStep's two graphs for batches of one shape, and the device arrays they read."""

    def __init__(self, step: TrainStep, inputs: Any, targets: Any):
        xp = backend.xp
        self.step = step
        self.inputs, self.targets = xp.asarray(inputs).copy(), xp.asarray(targets).copy()
        first_counter = backend.philox_counter()

        def gradients() -> ModelOutput:
            backend.rewind_philox(first_counter)  # the capture draws what its warm-up drew
            step.model.zero_grad()
            return step.forward_backward(self.inputs, self.targets)

        self.gradients = Graph(gradients, name="the training step's forward and backward")
        self.output: ModelOutput = self.gradients.output
        self.tables = step.optimizer.launch_tables()  # uploaded here, read by the update graph's launches: kept
        self.launched = self._launched()
        self.update = Graph(lambda: step.update(self.output), warmup=lambda: step.update(self.output, refused=True),
                            name="the training step's update")

    def run(self, inputs: Any, targets: Any) -> StepOutput:
        if inputs.shape != self.inputs.shape or targets.shape != self.targets.shape:
            raise ValueError(f"a captured training step takes batches of {tuple(self.inputs.shape)} tokens, "
                             f"got inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)}")
        arrays, decays = self._launched()
        captured_arrays, captured_decays = self.launched
        if decays != captured_decays or len(arrays) != len(captured_arrays) or any(
                array is not captured for array, captured in zip(arrays, captured_arrays)):
            raise RuntimeError("the optimizer's state or the gradients moved after the training step was "
                               "captured (a checkpoint loaded into the optimizer?): the graph would update "
                               "arrays that are gone")
        backend.write_into(self.inputs, inputs)
        backend.write_into(self.targets, targets)
        self.step.optimizer.advance()
        self.gradients.launch()
        self.update.launch()
        return _step_output(self.output, self.update.output)

    def _launched(self) -> tuple[list[Any], list[float]]:
        """The arrays the update graph acts on, and their weight decays. run() compares them with the
        capture's by identity (an array object keeps its address), not by the tables' key of addresses,
        sizes and dtypes: that key took about 1.5 ms of the host's time a step (hundreds of arrays, three
        attributes each), all of it before the graphs' launch, while the GPU waited."""
        roles, decays = self.step.optimizer.launch_roles()
        return [array for role in roles for array in role], decays

    def memory_bytes(self) -> int:
        return self.gradients.memory_bytes() + self.update.memory_bytes()


def _step_output(output: ModelOutput, grad_norm: Any) -> StepOutput:
    return StepOutput(output.loss.data, output.lm_loss.data, grad_norm, output.moe)
