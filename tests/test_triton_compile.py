"""The fused Phase 1 / Phase 2 kernels compile for a CUDA GPU (sm_90), without one.

The equality tests run the kernels in the Triton interpreter, which executes them as Python and so accepts code
that the compiler rejects (scoping, loop-carried types, returns in branches). ``triton.compile`` with an explicit
target runs the real front end, the GPU passes and ``ptxas`` on the CPU. One configuration per kernel mode.
"""

import os

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from models.layers import ar_ssm_triton as ar  # noqa: E402
from models.layers import bk_mixer_triton as bk  # noqa: E402
from models.layers import fast_weights_triton as fw  # noqa: E402

FLOATS = ("eta", "thr", "g_lo", "g_hi", "e_lo", "e_hi", "scale", "base_decay", "delta", "momentum")
POINTERS = {"rs_ptr": "*i8", "pos_ptr": "*i64", "end_ptr": "*i64", "calls_ptr": "*i1", "seen_ptr": "*i64"}
F32 = {"F64": False}
CASES = [
    ("bk forward, mixer", bk._bk_forward_kernel, dict(MIXER=True, HAS_DECAY=True, HAS_RESET=True, HAS_G0=True,
                                                      STATS=True, BLOCK_C=64, **F32)),
    ("bk backward, mixer", bk._bk_backward_kernel, dict(MIXER=True, HAS_DECAY=True, HAS_RESET=True, HAS_G0=True,
                                                        HAS_GRAD_G=True, BLOCK_C=64, **F32)),
    ("bk forward, scan", bk._bk_forward_kernel, dict(MIXER=False, HAS_DECAY=False, HAS_RESET=False, HAS_G0=False,
                                                     STATS=False, BLOCK_C=64, **F32)),
    *((f"ar-ssm {'reverse' if rev else 'forward'}, layer={layer}", ar._decayed_scan_kernel,
       dict(HAS_H0=True, REVERSE=rev, LAYER=layer, FROM_LOGIT=layer, HAS_SCALE=layer, HAS_GRAD_G=layer,
            HAS_GRAD_H=layer, BLOCK_T=64, BLOCK_R=32, **F32)) for layer in (False, True) for rev in (False, True)),
    ("ar-ssm gate statistics", ar._gate_stats_kernel, dict(BLOCK_R=32)),
    *((f"memory rule, raw={raw}", fw._rule_kernel, dict(RAW=raw, HAS_RULE=True, HAS_STATE=raw, HAS_RESET=True,
                                                         CHUNK=64, BK=16, BV=16, **F32)) for raw in (False, True)),
    ("memory prologue backward", fw._layer_inputs_backward_kernel, dict(BT=64, BK=16, BV=16, **F32)),
    ("memory attention forward", fw._attn_forward_kernel, dict(HAS_RESET=True, HAS_M0=False, BT=64, BK=16, BV=16,
                                                               PRECISION="ieee", **F32)),
    ("memory attention backward", fw._attn_backward_kernel, dict(HAS_RESET=True, HAS_DMF=False, BT=64, BK=16,
                                                                 BV=16, PRECISION="ieee", **F32)),
]


@pytest.mark.parametrize(("name", "kernel", "constexprs"), CASES, ids=[c[0] for c in CASES])
def test_kernel_compiles_for_sm90(name, kernel, constexprs):
    signature = {a: "constexpr" if a in constexprs else POINTERS.get(a, "*fp32") if a.endswith("_ptr")
                 else "fp32" if a in FLOATS else "i32" for a in kernel.arg_names}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
    except RuntimeError as e:
        if "ptxas" in str(e).lower() and "error" not in str(e).lower():
            pytest.skip(f"no usable ptxas here: {e}")
        raise
    assert compiled.asm["cubin"]
