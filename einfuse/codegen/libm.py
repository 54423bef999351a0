"""Device math that is the same program on a GPU and under Triton's interpreter.

Generated kernels call `libm.tanh(x)`, `libm.dot(a, b, acc)`, ... On a GPU these names *are* libdevice
functions and `tl.dot`, resolved by Triton's compiler. The interpreter has no libdevice and computes
bf16/f16 matmuls on raw 16-bit words, so in interpreter mode the same names are numpy-backed functions
and a dot that upcasts 16-bit operands to f32 (bf16 x bf16 products are exact in f32, so the result is
what the tensor core computes up to summation order).
"""
import numpy as np
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)

if not INTERPRET:
    # Wrappers, not the names themselves: Triton swaps the generic libdevice module for the target's
    # (CUDA or HIP) only in a jit function's own globals; `libm.tanh` bound to the generic stub
    # would compile to a call returning None.
    from triton.language.extra import libdevice

    @triton.jit
    def tanh(x):
        return libdevice.tanh(x)

    @triton.jit
    def log1p(x):
        return libdevice.log1p(x)

    @triton.jit
    def expm1(x):
        return libdevice.expm1(x)

    @triton.jit
    def tan(x):
        return libdevice.tan(x)

    @triton.jit
    def atan2(y, x):
        return libdevice.atan2(y, x)

    @triton.jit
    def pow(x, y):
        return libdevice.pow(x, y)

    @triton.jit
    def nearbyint(x):
        return libdevice.nearbyint(x)

    @triton.jit
    def trunc(x):
        return libdevice.trunc(x)

    dot = tl.dot
else:
    from triton.runtime.interpreter import TensorHandle

    def _unary(np_fn):
        def fn(x):
            data = np_fn(x.handle.data)
            return tl.core.tensor(TensorHandle(data.astype(x.handle.data.dtype), x.handle.dtype.scalar), x.type)

        return fn

    def _binary(np_fn):
        def fn(x, y):
            data = np_fn(x.handle.data, y.handle.data if hasattr(y, "handle") else np.asarray(y))
            return tl.core.tensor(TensorHandle(data.astype(x.handle.data.dtype), x.handle.dtype.scalar), x.type)

        return fn

    tanh = _unary(np.tanh)
    log1p = _unary(np.log1p)
    expm1 = _unary(np.expm1)
    tan = _unary(np.tan)
    nearbyint = _unary(np.rint)
    trunc = _unary(np.trunc)
    atan2 = _binary(np.arctan2)
    pow = _binary(np.power)

    def dot(a, b, acc=None, input_precision=None, out_dtype=tl.float32):
        """tl.dot with 16-bit float operands upcast to f32 (the interpreter cannot multiply them)."""
        if a.dtype in (tl.bfloat16, tl.float16):
            a = a.to(tl.float32)
        if b.dtype in (tl.bfloat16, tl.float16):
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, out_dtype=out_dtype)
