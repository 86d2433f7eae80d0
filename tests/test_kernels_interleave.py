"""jax_nvfp4.kernels.block_scale_interleave: the FFI plumbing (jax-tvm-ffi) on CPU.

flashinfer's compiled kernel needs CUDA, so on CPU the same FFI targets are bound to a
stand-in with flashinfer's calling convention (``f(input, output)``, output written
from its data pointer), a numpy swizzle. The bytes are checked against the independent
reference (``_reference.swizzle``); the GPU test (test_gpu_tvm_ffi.py) checks the real
kernel.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax_tvm_ffi")

from jax_nvfp4.backends import flashinfer as _flashinfer
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.kernels import _ffi, _interleave, block_scale_interleave
from helpers import assert_bytes_equal

CALLS: list = []


def _bytes(t):
    """A tvm_ffi tensor's memory as numpy uint8 (numpy's DLPack has no float8)."""
    n = t.numel() * (1 if "8" in str(t.dtype) else np.dtype(str(t.dtype)).itemsize)
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(t.data_ptr()))


def _stand_in(src, out):
    s = _bytes(src).reshape(tuple(src.shape))
    b, r, c = s.shape
    rp, cp = -(-r // 128) * 128, -(-c // 4) * 4
    x = np.zeros((b, rp, cp), np.uint8)
    x[:, :r, :c] = s
    o = _bytes(out)
    o[:b * rp * cp] = x.reshape(b, rp // 128, 4, 32, cp // 4, 4).transpose(
        0, 1, 4, 3, 2, 5).reshape(-1)
    CALLS.append(dict(src=tuple(src.shape), src_dtype=str(src.dtype), out=out.data_ptr()))


@pytest.fixture(autouse=True)
def cpu_stand_in(on_cpu):
    _interleave._STAND_INS.setdefault("cpu", (_stand_in, {"pass_owned_tensor": True}))
    CALLS.clear()


def _scales(rng, shape, dtype=jnp.float8_e4m3fn):
    b = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return b, jax.lax.bitcast_convert_type(jnp.asarray(b), dtype)


@pytest.mark.parametrize("shape", [(1, 128, 4), (3, 256, 8), (2, 100, 6), (4, 384, 28)])
@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float8_e4m3fn])
def test_new_buffer_holds_the_reference_swizzle(rng, shape, dtype):
    b, s = _scales(rng, shape, dtype)
    for f in (block_scale_interleave, jax.jit(block_scale_interleave)):
        got = f(s)
        rp, cp = -(-shape[1] // 128) * 128, -(-shape[2] // 4) * 4
        assert got.shape == (shape[0], rp, cp) and got.dtype == dtype
        assert_bytes_equal(np.asarray(got).reshape(-1), _reference.swizzle(b))
    assert CALLS[-1]["src_dtype"] == "uint8"  # float8 crosses as its bytes


def test_a_corrupted_input_is_seen(rng):
    b, s = _scales(rng, (2, 128, 8))
    bad = b.copy()
    bad[1, 77, 3] ^= 0x10
    got = np.asarray(block_scale_interleave(jnp.asarray(bad))).reshape(-1)
    assert (got != _reference.swizzle(b)).sum() == 1


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.float8_e4m3fn])
def test_donated_out_is_written_in_place(rng, dtype):
    b, s = _scales(rng, (3, 256, 8))
    f = jax.jit(lambda buf, x: block_scale_interleave(x, out=buf), donate_argnums=0)
    buf = jax.lax.bitcast_convert_type(
        jnp.asarray(rng.integers(0, 256, size=b.shape, dtype=np.uint8)), dtype)
    ptr = buf.unsafe_buffer_pointer()
    got = jax.block_until_ready(f(buf, s))
    assert buf.is_deleted() and got.unsafe_buffer_pointer() == ptr
    assert CALLS[-1]["out"] == ptr  # the kernel itself wrote into the donated buffer
    assert got.dtype == dtype and got.shape == b.shape
    assert_bytes_equal(np.asarray(got).reshape(-1), _reference.swizzle(b))
    ma = f.lower(jnp.zeros(b.shape, dtype), s).compile().memory_analysis()
    assert ma.alias_size_in_bytes == b.size


def test_out_not_donated_is_left_alone(rng):
    b, s = _scales(rng, (2, 128, 8))
    keep = rng.integers(0, 256, size=(b.size,), dtype=np.uint8)
    out = jnp.asarray(keep)
    got = jax.jit(lambda o, x: block_scale_interleave(x, out=o))(out, s)
    assert_bytes_equal(got, _reference.swizzle(b))
    assert_bytes_equal(out, keep)


def test_start_writes_only_its_experts_in_place(rng):
    b, s = _scales(rng, (3, 256, 8))
    keep = rng.integers(0, 256, size=(7, 256, 8), dtype=np.uint8)
    f = jax.jit(lambda o, x: block_scale_interleave(x, out=o, start=2), donate_argnums=0)
    out = jnp.asarray(keep)
    ptr = out.unsafe_buffer_pointer()
    got = f(out, s)
    assert got.unsafe_buffer_pointer() == ptr
    flat = np.asarray(got).reshape(7, -1)
    assert_bytes_equal(flat[2:5].reshape(-1), _reference.swizzle(b))
    assert_bytes_equal(np.delete(flat, [2, 3, 4], 0), np.delete(keep.reshape(7, -1), [2, 3, 4], 0))


def test_scale_writer_takes_the_ffi_route(rng, monkeypatch):
    # The flashinfer backend's writer, with identity rows, on the stand-in.
    assert _flashinfer._via_ffi()
    fn, write = _flashinfer.scale_writer(lambda x: x)
    assert _kernel_of(fn) is block_scale_interleave
    b, s = _scales(rng, (4, 128, 8))
    assert_bytes_equal(np.asarray(jax.jit(fn)(s)).reshape(-1), _reference.swizzle(b))
    buf = jnp.zeros(b.shape, jnp.float8_e4m3fn)
    got = jax.jit(lambda o, x: write(o, 1, x[1:3]), donate_argnums=0)(buf, s)
    assert_bytes_equal(np.asarray(got)[1:3].reshape(-1), _reference.swizzle(b[1:3]))
    monkeypatch.setattr(_ffi, "missing", lambda: "jax-tvm-ffi is not installed")
    assert not _flashinfer._via_ffi()
    torch_bridge = pytest.importorskip("torch_bridge")
    fn, _ = _flashinfer.scale_writer(lambda x: x)
    assert _kernel_of(fn) is torch_bridge.block_scale_interleave  # the buffer_callback fallback


def _kernel_of(fn):
    return next(c.cell_contents for c in fn.__closure__
                if getattr(c.cell_contents, "__name__", "") == "block_scale_interleave")


@pytest.mark.parametrize("bad, err, match", [
    (lambda s: block_scale_interleave(s.astype(jnp.float32)), TypeError, "uint8 or float8"),
    (lambda s: block_scale_interleave(s[0, 0]), ValueError, r"\[E, R, C\]"),
    (lambda s: block_scale_interleave(s, out=jnp.zeros((100,), jnp.uint8)), ValueError,
     "do not hold experts"),
    (lambda s: block_scale_interleave(s, out=jnp.zeros((4096,), jnp.float32)), TypeError, "out"),
    (lambda s: block_scale_interleave(s, start=1), ValueError, "needs out="),
    (lambda s: block_scale_interleave(s, out=jnp.zeros(s.shape, jnp.uint8), start=-1),
     ValueError, "non-negative"),
])
def test_bad_arguments_are_refused(rng, bad, err, match):
    _, s = _scales(rng, (2, 128, 8), jnp.uint8)
    with pytest.raises(err, match=match):
        bad(s)
    assert not CALLS


def test_deleted_arrays_are_refused(rng):
    _, s = _scales(rng, (2, 128, 8), jnp.uint8)
    out = jnp.zeros(s.shape, jnp.uint8)
    out.delete()
    with pytest.raises(ValueError, match="out has been deleted"):
        block_scale_interleave(s, out=out)


def test_missing_jax_tvm_ffi_is_named(rng, monkeypatch):
    monkeypatch.setattr(_ffi, "missing", lambda: "jax-tvm-ffi is not installed; pip install x")
    _, s = _scales(rng, (2, 128, 8), jnp.uint8)
    with pytest.raises(ImportError, match="jax-tvm-ffi is not installed"):
        block_scale_interleave(s)


def test_other_platforms_are_refused():
    with pytest.raises(ValueError, match="needs a CUDA GPU.*on tpu"):
        _interleave.ensure("tpu")
