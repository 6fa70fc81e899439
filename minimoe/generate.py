"""Text from a trained GPT: prompts in, completions out, through the generation engine (engine.py):
all prompts at once, each with a KV cache, every MoE layer routing without drops onto the chosen
experts only, sampling on the device.

Under mpirun with several ranks the model's experts are split over them (expert parallelism, as in
training): each rank generates its share of the prompts, the MoE layers exchange rows by all-to-all,
and every rank ends with every completion.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minimoe import backend
from minimoe.engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    Engine,
    GenerationError,
    SamplingParams,
    Sequence,
    completion_text,
)
from minimoe.model import GPT


def prepare(model: GPT) -> GPT:
    """The model's working weights for inference on the current device: bf16 on the GPU (the gate stays
    float32), as they are on the CPU."""
    if backend.device() == "cuda" and model.wte.weight.dtype == np.float32:
        model.to(backend.bfloat16())
    return model.eval()


def generate(model: GPT, prompts: list[np.ndarray], params: SamplingParams | list[SamplingParams],
             comm: Any = None) -> list[Sequence]:
    """One finished Sequence per prompt (token arrays), in order. `params` for all or one per prompt.
    `comm`: the ranks of an expert-parallel model (None: one process)."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise GenerationError(f"{len(prompts)} prompts need as many sampling settings, got {len(params)}")
    if not prompts:
        raise GenerationError("no prompt given")
    rank, ranks = (0, 1) if comm is None else (comm.rank, comm.size)
    mine = list(range(rank, len(prompts), ranks))  # this rank's share
    engine = Engine(model, slots=max(len(mine), 1), lockstep=comm is not None)
    sequences = {index: engine.submit(prompts[index], params[index]) for index in mine}
    if comm is None:
        engine.run_to_completion()
        return [sequences[index] for index in range(len(prompts))]
    # Expert parallel: every rank steps while any rank has work, since each step's MoE layers exchange rows.
    while comm.all_reduce(np.array([int(engine.busy)]))[0] > 0:
        engine.admit()
        engine.step()
    return _gather(sequences, prompts, params, comm)


def _gather(sequences: dict[int, Sequence], prompts: list[np.ndarray], params: list[SamplingParams],
            comm: Any) -> list[Sequence]:
    """Every rank's finished sequences on every rank: tokens and counts summed over the ranks (each
    prompt's row is non-zero on the one rank that generated it); text and finish reason follow from them."""
    longest = max(p.max_new_tokens for p in params)
    tokens = np.zeros((len(prompts), longest), dtype=np.int64)
    counts = np.zeros(len(prompts), dtype=np.int64)
    for index, sequence in sequences.items():
        tokens[index, :len(sequence.generated)] = sequence.generated
        counts[index] = len(sequence.generated)
    tokens, counts = comm.all_reduce(tokens), comm.all_reduce(counts)
    gathered = []
    for index, prompt in enumerate(prompts):
        sequence = Sequence(np.asarray(prompt), params[index], generated=tokens[index, :counts[index]].tolist())
        sequence.text, stopped = completion_text(sequence.generated, sequence.params.stop)
        sequence.finish_reason = FINISH_STOP if stopped else FINISH_LENGTH
        gathered.append(sequence)
    return gathered
