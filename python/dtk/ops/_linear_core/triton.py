"""Triton jit helpers shared by the linear-attention families (ops/linear, ops/memo)."""
import triton
import triton.language as tl


@triton.jit
def mm(a, b, acc, LOWP: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b. LOWP: a and b are already in the (16-bit) input dtype, one tensor-core dot
    with fp32 accumulation; otherwise fp32 operands (exact fp32 products when IEEE)."""
    if LOWP:
        acc = tl.dot(a, b, acc)
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc
