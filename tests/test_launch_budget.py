"""Launch budget of the fused Phase 1 / Phase 2 layers (issue 21).

On a GPU every dispatched PyTorch operation that is not a view is a kernel launch of a few microseconds, and every
Triton call is one more, so a layer's forward + backward must issue a small number of them, independent of the
sequence length. The layers run on their fused paths (Triton under ``TRITON_INTERPRET=1``, in a subprocess) and
``models.utils.launches.count_launches`` counts: PyTorch operations by ``TorchDispatchMode`` (views counted
apart: they launch nothing) and Triton launches by wrapping the interpreter's launch. Dimensions are tiny; the
counts must be identical at 256 and 4096 tokens. The budgets are the measured counts rounded up a little: a
change that adds per-chunk or per-token Python work breaks the equality, one that adds a few operations per
layer breaks the budget and must raise it here on purpose.
"""

import pytest

from tests.triton_helpers import run_interpreted

pytest.importorskip("triton")

# launches (non-view PyTorch operations + Triton launches) of one layer's forward + backward, the loss included.
# Measured (torch 2.14, interpreter): BK 22, AR-SSM 37, memory 25 (with a reset; its torch path: ~1200 at 64
# tokens, ~4000 at 200); before the prologues and epilogues moved into the kernels: 57, 79, 124. What remains:
# the loss (6), the projections' matmuls and their backward (2-3 per linear; AR-SSM's gate MLP has two),
# weight concatenations, a few buffer allocations and one reduction per parameter gradient summed over programs.
BUDGET = {"bk": 22, "ar_ssm": 37, "memory": 25}
TRITON = {"bk": {"_bk_forward_kernel": 1, "_bk_backward_kernel": 1},
          "ar_ssm": {"_decayed_scan_kernel": 2, "_gate_stats_kernel": 1},
          "memory": {"_rule_kernel": 1, "_attn_forward_kernel": 1, "_attn_backward_kernel": 1,
                     "_layer_inputs_backward_kernel": 1}}

SCRIPT = r"""
import json
import torch
from models.layers.ar_ssm import ARSSM
from models.layers.bk_mixer import BKMixer
from models.layers.fast_weights import DissipativeHebbianMemory
from models.utils.launches import count_launches

torch.manual_seed(0)
layers = {"bk": BKMixer(8, backend="triton"), "ar_ssm": ARSSM(8, 4, 2, backend="triton"),
          "memory": DissipativeHebbianMemory(8, 2, 4, chunk_size=64, backend="triton")}
out = {}
for n in (256, 4096):
    x = torch.randn(1, n, 8, requires_grad=True)
    reset = torch.zeros(1, n, dtype=torch.bool)
    reset[0, n // 3] = True  # a document boundary inside the sequence
    for name, layer in layers.items():
        kwargs = {"reset": reset} if name == "memory" else {}
        def step():  # gradients returned, not accumulated: the same work on every call
            torch.autograd.grad(layer(x, **kwargs).square().sum(), [x, *layer.parameters()])
        if n == 256:
            step()  # warm-up (first-call caches)
        c = count_launches(step)
        out[f"{name}@{n}"] = {"ops": c.torch_ops, "views": c.views, "triton": dict(c.triton),
                              "launches": c.launches}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def counts():
    return run_interpreted(SCRIPT, timeout=600)


@pytest.mark.parametrize("layer", sorted(BUDGET))
def test_fused_layer_launches_are_few_and_length_independent(counts, layer):
    short, long = counts[f"{layer}@256"], counts[f"{layer}@4096"]
    assert short == long, (short, long)  # not one more operation for 16x the tokens
    assert long["triton"] == TRITON[layer]  # one launch per direction per scan
    assert long["launches"] <= BUDGET[layer], long
