"""Run under mpiexec by tests/test_moe_ep.py: the expert-parallel MoE layer against the one-process layer.

Every rank routes its own tokens, so the one-process reference on each rank is the same layer (all E
experts, the same weights) applied to that rank's tokens with the same noise. Outputs, input
gradients and gate / residual gradients must match rank by rank; the gradient of an expert, which
sees the tokens of every rank of the expert-parallel group, must equal the sum over that group of the
reference's gradients for it. Float64 throughout. argv[1]: JSON {"k", "residual", "ep_size",
"drop_tokens", "local_size"}.
"""

import json
import sys

import numpy as np

from minimoe import backend
from minimoe.comm.communicator import MPIComm
from minimoe.comm.groups import build_groups
from minimoe.moe.gate import MoESettings
from minimoe.moe.layer import MoE
from minimoe.tensor import Tensor

spec = json.loads(sys.argv[1])
world = MPIComm()
experts, width, hidden, tokens = 4, 6, 10, 13
if not spec["drop_tokens"]:
    tokens += world.rank  # dropless, ranks may route different numbers of tokens (capacity is per rank)
groups = build_groups(world, spec["ep_size"], [experts], spec["local_size"])
settings = MoESettings(k=spec["k"], capacity_factor=0.75, min_capacity=1, use_rts=spec["k"] == 1,
                       second_expert_sampling=spec["k"] == 2,  # short capacity: tokens are dropped ...
                       drop_tokens=spec["drop_tokens"])  # ... unless dropless (only used rows travel)


def layer(expert_parallel=None) -> MoE:
    return MoE(width, hidden, experts, settings, np.random.default_rng(7), 0.5, spec["residual"],
               expert_parallel=expert_parallel).to(np.float64).train()


rng = np.random.default_rng(100 + world.rank)
x, grad = rng.standard_normal((tokens, width)), rng.standard_normal((tokens, width))
mask = rng.random(tokens) < 0.7 if spec["mask"] else None  # padding tokens, routed nowhere
results = {}
for name, moe in (("reference", layer()), ("expert parallel", layer(groups.expert_parallel))):
    backend.manual_seed(world.rank)  # the same routing noise for both
    inputs = Tensor(x.copy(), requires_grad=True)
    y, routing = moe(inputs, token_mask=mask)
    ((y * grad).sum() + 0.3 * routing.aux_loss).backward()
    results[name] = (moe, y.data, inputs.grad)

reference, y_reference, x_grad_reference = results["reference"]
parallel, y_parallel, x_grad_parallel = results["expert parallel"]
np.testing.assert_allclose(y_parallel, y_reference, rtol=1e-12, atol=1e-12, err_msg=f"rank {world.rank}: output")
np.testing.assert_allclose(x_grad_parallel, x_grad_reference, rtol=1e-10, atol=1e-12, err_msg="input gradient")
local = experts // spec["ep_size"]
first = groups.expert_parallel.rank * local
for (name, ours), (_, theirs) in zip(parallel.named_parameters(), reference.named_parameters()):
    expected = theirs.grad
    if name.startswith("experts."):  # summed over the tokens of the whole expert-parallel group
        expected = groups.expert_parallel.all_reduce(expected)[first:first + local]
    np.testing.assert_allclose(ours.grad, expected, rtol=1e-10, atol=1e-12, err_msg=f"rank {world.rank}: {name}")
print(f"rank {world.rank}: ok")
