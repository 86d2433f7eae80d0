"""flashinfer's block_scale_interleave from JAX: XLA FFI (jax-tvm-ffi) against buffer_callback.

In one run on one GPU, for each shape: the scale swizzle by XLA (``_layout.swizzle_scales``),
flashinfer's kernel from torch (CUDA events), and flashinfer's kernel inside ``jax.jit``
through (a) ``jax_nvfp4.kernels.block_scale_interleave`` (one FFI custom call; jax-tvm-ffi)
and (b) ``torch_bridge.block_scale_interleave`` (``buffer_callback`` + torch on XLA's
stream), each to a new buffer and into a donated one. Every result is compared byte for
byte with XLA's swizzle and with flashinfer called from torch before its time counts; the
donated forms must return the donated buffer (pointer identity).

Wall: median ms from the call to ``block_until_ready`` (dispatch included). Device: median
ms between CUDA events recorded on XLA's stream just before and after the call (two
``buffer_callback`` markers ordered by data dependence), so host work that leaves the
stream idle between them (a callback's Python and torch) counts, JAX's dispatch does not.

Then ``prepare_layer(backend="flashinfer")`` donated on small layers, with the FFI route
and with the buffer_callback fallback (``jax_nvfp4.kernels._ffi.missing`` patched).

On the GPU machine::

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/tvm_ffi_route.py --out tvm_ffi.json

Without a CUDA device, flashinfer or jax-tvm-ffi it says what is missing and exits with code 2.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = {  # scale arrays [E, R, C] (bytes)
    "tiny (1, 128, 4)": (1, 128, 4),
    "qwen3-30b TP8 w13 scale (128, 256, 128)": (128, 256, 128),
    "qwen3-30b w13 scale (128, 1536, 128)": (128, 1536, 128),
    "256 x 4096 x 448": (256, 4096, 448),
}
LAYERS = {"qwen3-30b-a3b TP8 (128, 2048, 128)": (128, 2048, 128),
          "qwen3-30b-a3b (128, 2048, 768)": (128, 2048, 768)}


def _wall(fn, make_args, repeats):
    out = []
    for k in range(3 + repeats):
        args = jax.block_until_ready(make_args())
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if k >= 3:
            out.append(time.perf_counter() - t0)
        del args
    return 1e3 * statistics.median(out)


def _device(f, into, make_args, repeats):
    """Device ms of ``f`` through the bench's event bracketing (``bench.device_time``).

    That function times a layer program of four arrays (all donated when ``donate``), so the
    call is padded to four arguments; the padding (and the donated source) is returned, so
    every donated buffer is aliased to an output.
    """
    from jax_nvfp4.bench import layout as bench
    dummy = jnp.zeros((1,), jnp.uint8)
    if into:  # (buffer, source): the buffer is donated, and the source with it here
        def program(b, x, p, q):
            return f(b, x), x, p, q

        def make():
            b, x = make_args()
            return b, bench._copy(x), bench._copy(dummy), bench._copy(dummy)
    else:
        def program(x, p, q, r):
            return f(x), p, q, r

        def make():
            return (*make_args(), dummy, dummy, dummy)
    return bench.device_time(program, into, make, repeats)


def _u8(x):
    return x if x.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(x, jnp.uint8)


def swizzle_rows(repeats, log):
    import flashinfer
    import torch

    import torch_bridge
    from jax_nvfp4 import kernels
    from jax_nvfp4.layout import index as _layout

    rows = []
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for name, shape in SHAPES.items():
        s = jax.device_put(jnp.asarray(rng.integers(0, 256, shape, dtype=np.uint8)))
        s8 = jax.lax.bitcast_convert_type(s, jnp.float8_e4m3fn)
        xla = jax.jit(_layout.swizzle_scales)
        want = np.asarray(xla(s)).reshape(-1)
        ts = torch_bridge.to_torch(s).clone()
        tout = torch.empty(ts.numel(), dtype=torch.uint8, device=ts.device)
        flashinfer.block_scale_interleave(ts, out=tout)
        torch.cuda.synchronize()
        if not np.array_equal(tout.cpu().numpy(), want):
            raise AssertionError(f"{name}: flashinfer from torch differs from XLA's swizzle")
        progs = {
            "xla swizzle": (xla, False),
            "ffi new buffer": (jax.jit(lambda x: kernels.block_scale_interleave(x)), False),
            "buffer_callback new buffer": (
                jax.jit(lambda x: torch_bridge.block_scale_interleave(x)), False),
            "ffi into donated": (jax.jit(lambda b, x: kernels.block_scale_interleave(x, out=b),
                                         donate_argnums=0), True),
            "buffer_callback into donated": (
                jax.jit(lambda b, x: torch_bridge.block_scale_interleave(x, out=b),
                        donate_argnums=0), True),
        }
        for label, (f, into) in progs.items():
            for src in (s, s8):
                if into:
                    buf = jnp.zeros(shape, src.dtype)
                    p = buf.unsafe_buffer_pointer()
                    got = f(buf, src)
                    same = got.unsafe_buffer_pointer() == p and buf.is_deleted()
                    if not same:
                        raise AssertionError(f"{name} {label}: not in the donated buffer")
                else:
                    got = f(src)
                if not np.array_equal(np.asarray(_u8(got)).reshape(-1), want):
                    raise AssertionError(f"{name} {label} ({src.dtype}): bytes differ")
            if into:
                def make(src=s):
                    return (jnp.zeros(shape, jnp.uint8), src)
            else:
                def make(src=s):
                    return (src,)
            wall = _wall(f, make, repeats)
            dev = _device(f, into, make, repeats)
            rows.append(dict(shape=name, method=label, wall_ms=wall, device_ms=dev,
                             bytes=int(np.prod(shape))))
            log(f"{name:42s} {label:30s} wall {wall:8.3f} ms  device {dev:8.3f} ms")
        samples = []
        for k in range(3 + repeats):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            flashinfer.block_scale_interleave(ts, out=tout)
            e1.record()
            torch.cuda.synchronize()
            if k >= 3:
                samples.append(e0.elapsed_time(e1))
        dev = statistics.median(samples)
        rows.append(dict(shape=name, method="flashinfer from torch (events)", wall_ms=None,
                         device_ms=dev, bytes=int(np.prod(shape))))
        log(f"{name:42s} {'flashinfer from torch':30s} {'':19s} device {dev:8.3f} ms")
        del ts, tout
    # JAX's own floor for one jitted call: a program doing one tiny op.
    inc = jax.jit(lambda x: x + 1)
    x = jnp.zeros((4,), jnp.uint8)
    wall = _wall(inc, lambda: (x,), repeats)
    rows.append(dict(shape="(4,)", method="jit dispatch floor (x + 1)", wall_ms=wall,
                     device_ms=None, bytes=4))
    log(f"{'(4,)':42s} {'jit dispatch floor (x + 1)':30s} wall {wall:8.3f} ms")
    return rows


def layer_rows(repeats, log):
    import jax_nvfp4
    from jax_nvfp4 import transform as _prepare
    from jax_nvfp4.backends import flashinfer as _flashinfer
    from jax_nvfp4.kernels import _ffi
    from jax_nvfp4.layout import reference as _reference

    rows = []
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for name, (e, h, i) in LAYERS.items():
        host = [rng.integers(0, 256, s, dtype=np.uint8) for s in
                ((e, 2 * i, h // 2), (e, 2 * i, h // 16), (e, h, i // 2), (e, h, i // 16))]
        want = _reference.prepare_layer(*host, gated=True)

        def make():
            arrs = [jnp.asarray(a) for a in host]
            return [arrs[0], jax.lax.bitcast_convert_type(arrs[1], jnp.float8_e4m3fn),
                    arrs[2], jax.lax.bitcast_convert_type(arrs[3], jnp.float8_e4m3fn)]

        for route in ("ffi", "buffer_callback"):
            # prepare_layer caches its compiled programs: drop them so each route traces anew.
            _prepare._compiled.cache_clear()
            saved = _ffi.missing
            if route == "buffer_callback":
                _ffi.missing = lambda: "forced off by the benchmark"
            try:
                for backend, chunk in (("flashinfer", None), ("flashinfer", 1 << 30),
                                       ("xla", None)):
                    if backend == "xla" and route != "ffi":
                        continue
                    if backend == "flashinfer" and _flashinfer._via_ffi() != (route == "ffi"):
                        raise AssertionError(f"route {route} not taken")
                    out = jax_nvfp4.prepare_layer(*make(), backend=backend, donate=True,
                                                  chunk_bytes=chunk)
                    for k, (g, w) in enumerate(zip(out, want)):
                        if not np.array_equal(np.asarray(_u8(g)), np.asarray(w).view(np.uint8)):
                            raise AssertionError(f"{name} {backend} {route}: array {k} differs")
                    wall = _wall(lambda *a, b=backend, c=chunk: jax_nvfp4.prepare_layer(
                        *a, backend=b, donate=True, chunk_bytes=c), make, repeats)
                    label = f"prepare_layer {backend}" + (
                        f" ({route}{', one chunk' if chunk else ''})" if backend != "xla" else "")
                    rows.append(dict(shape=name, method=label, wall_ms=wall, device_ms=None))
                    log(f"{name:42s} {label:40s} wall {wall:8.3f} ms (donated)")
            finally:
                _ffi.missing = saved
                _prepare._compiled.cache_clear()
    return rows


def missing() -> str | None:
    """Why this script cannot run here (None when it can)."""
    from jax_nvfp4.backends import flashinfer as _flashinfer
    from jax_nvfp4.kernels import _ffi
    if jax.devices()[0].platform != "gpu":
        return f"needs a CUDA GPU; JAX's default device is {jax.devices()[0].platform}"
    return _flashinfer.missing() or _ffi.missing()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-layers", action="store_true", help="the swizzle rows only")
    p.add_argument("--layers-only", action="store_true", help="the prepare_layer rows only")
    a = p.parse_args(argv)
    why = missing()
    if why:
        print(f"tvm_ffi_route.py: {why}", file=sys.stderr)
        return 2
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} (cc {getattr(dev, 'compute_capability', '?')}), "
        f"jax {jax.__version__}")
    import flashinfer
    import tvm_ffi
    log(f"flashinfer {flashinfer.__version__}, apache-tvm-ffi {tvm_ffi.__version__}")
    rows = [] if a.layers_only else swizzle_rows(a.repeats, log)
    if not a.no_layers:
        try:
            rows += layer_rows(max(5, a.repeats // 3), log)
        except Exception as e:  # noqa: BLE001 - report and keep the swizzle figures
            log(f"layer rows failed: {type(e).__name__}: {e}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
