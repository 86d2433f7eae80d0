"""``python -m jax_nvfp4 bench``: time prepare_layer against the copy floor and torch baselines.

In one run, per shape: the device's copy bandwidth (the floor is the layer's
bytes read + written over it), jax_nvfp4 donated / not donated for each
backend, the scale swizzle alone (XLA vs flashinfer's kernel), and two torch
implementations written from the published algorithms: sglang before PR
#26861 (per-expert lists + ``torch.stack``) and after it / vLLM 0.33
(preallocated outputs, ``index_select(out=)``, one scratch per array). Every
result is checked byte for byte against an independent reference (the index
formulas of ``_reference``, run in numpy on the host) before its time is kept.
Times are medians over repeats after a warm-up, synchronized with
``block_until_ready`` (JAX) or CUDA events (torch). The jax_nvfp4 variants of a layer
are timed round by round, each once per round, so that they compare (``auto`` against
the backend it picks: the same program). Inputs are random bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import layer as _layer, options as _options, transform as _prepare
from ..backends import flashinfer as _flashinfer
from ..layout import reference as _reference
from ..backends.triton import program as _triton
from ..errors import UserError
from ..layout.spec import NAMES, LayerSpec
from ..testing import random_device_layer

# name: (E, H, I, gated). Padded ones: Qwen3-30B TP8's I = 96 -> 128 (gated: each half a
# multiple of 64), Nemotron-3-Nano's H = 2688 -> 2816 (hidden_alignment=256), I = 1856 -> 1920.
# "-loaded": that layer as `load` gives it to prepare_layer on an accelerator, zero-padded on
# the host (checkpoint.load.pad_into): in place, one chunk of scratch.
SHAPES = {
    "deepseek-v3": (256, 7168, 2048, True),
    "deepseek-v3-tp8": (256, 7168, 256, True),
    "deepseek-v3-ep8": (32, 7168, 2048, True),
    "kimi-k2": (384, 7168, 2048, True),
    "qwen3-30b-a3b": (128, 2048, 768, True),
    "qwen3-30b-a3b-tp8": (128, 2048, 96, True),
    "nemotron-3-nano": (128, 2688, 1856, False),
    "nemotron-3-nano-loaded": (128, 2816, 1920, False),
    "tiny": (8, 256, 128, True),  # 1.3 MiB: the time of a call is its fixed cost
}
CPU_SHAPES = {"cpu-small": (8, 256, 128, True), "cpu-tp": (16, 512, 64, True),
              "cpu-padded": (8, 384, 96, True), "cpu-not-gated": (8, 384, 192, False)}
NAMES4 = ("w13", "w13_scale", "w2", "w2_scale")


def configure(p):
    p.add_argument("--shape", action="append", default=None,
                   help=f"a shape name ({', '.join(SHAPES)}) or E,H,I (gated) or E,H,I,ng "
                        "(not gated); repeatable (default: all of them, none with --model)")
    p.add_argument("--cpu", action="store_true",
                   help="small shapes, few repeats: a smoke run for CPU/CI")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10, at least "
                        f"{SMALL_LAYER_ROUNDS} for layers under 1 GiB; 2 --cpu)")
    p.add_argument("--no-torch", dest="torch", action="store_false",
                   help="skip the torch baselines")
    p.add_argument("--model", action="append", default=None, metavar="NAME:LAYERS",
                   help="also time prepare(params) over a whole model of LAYERS random layers "
                        "of shape NAME (donated, in one call), e.g. qwen3-30b-a3b:48")
    p.add_argument("--skip", action="append", default=[], metavar="BACKEND",
                   help="leave a jax_nvfp4 backend out (e.g. flashinfer); repeatable")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--out-dir", default=None,
                   help="write JSON and a copy of the table to DIR/<card>-<date>-<commit>.json/.md")


def _parse_shape(s: str):
    if s in SHAPES or s in CPU_SHAPES:
        return s, {**SHAPES, **CPU_SHAPES}[s]
    parts = s.split(",")
    gated = not (len(parts) == 4 and parts[3] == "ng")
    try:
        if len(parts) not in (3, 4) or (len(parts) == 4 and gated):
            raise ValueError
        e, h, i = (int(v) for v in parts[:3])
    except ValueError:
        raise UserError(f"--shape {s!r}: expected one of {list(SHAPES)} or E,H,I or "
                        "E,H,I,ng") from None
    return s, (e, h, i, gated)


# --- measuring -----------------------------------------------------------------------------

class _Poller:
    """Peak of ``bytes_in_use`` of a device while a block runs (JAX's peak cannot be reset)."""

    def __init__(self, device):
        self.device = device
        self.ok = device.platform != "cpu" and bool(device.memory_stats())
        self.peak = 0

    def _now(self) -> int:
        return int(self.device.memory_stats()["bytes_in_use"]) if self.ok else 0

    def __enter__(self):
        self.base = self.peak = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        if self.ok:
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(5e-5)

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()
            self.peak = max(self.peak, self._now())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def _median_ms(samples) -> float:
    return 1e3 * statistics.median(samples)


def time_jax(fn, make_args, repeats: int, warmup: int = 1):
    """Median seconds of ``fn(*make_args())`` (args made outside the timed region)."""
    samples = []
    for k in range(warmup + repeats):
        args = jax.block_until_ready(make_args())
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if k >= warmup:
            samples.append(time.perf_counter() - t0)
        del args
    return samples


_invert = jax.jit(lambda x: ~x)  # reads and writes every byte once: what a copy moves


def _copy(x):
    """A fresh buffer with the bytes of ``x`` (to donate while keeping ``x``)."""
    return jnp.array(x, copy=True)


def copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, bytes read plus written.

    The best of XLA's elementwise pass over uint32 words (uint8 runs at a third
    of it: XLA moves one byte per thread) and, where torch sees the device,
    torch's ``copy_`` (cudaMemcpy).
    """
    x = jax.device_put(jax.random.bits(jax.random.key(1), (nbytes // 4,), jnp.uint32), device)
    best = 2 * x.nbytes / statistics.median(time_jax(_invert, lambda: (x,), repeats, warmup=2))
    if device.platform == "gpu" and _flashinfer.missing() is None:
        import torch

        import torch_bridge
        src = torch_bridge.to_torch(x)
        dst = torch.empty_like(src)
        samples = []
        for k in range(2 + repeats):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            dst.copy_(src)
            t1.record()
            torch.cuda.synchronize()
            if k >= 2:
                samples.append(t0.elapsed_time(t1) / 1e3)
        best = max(best, 2 * x.nbytes / statistics.median(samples))
        del src, dst
        torch.cuda.empty_cache()
    return best


# --- data and reference ---------------------------------------------------------------------

def _as_u8(x):
    return x if x.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(x, jnp.uint8)


def _swizzle_index(r: int, c: int) -> np.ndarray:
    """Gather index of the swizzle: ``out.flat[o] = in.flat[idx[o]]`` per expert (no padding)."""
    rr, cc = np.meshgrid(np.arange(r), np.arange(c), indexing="ij")
    idx = np.empty(r * c, np.int32)
    idx[_reference.sf_offset_128x4(0, rr, cc, r, c).reshape(-1)] = np.arange(r * c)
    return idx


@jax.jit
def _equal(a, b):
    return jnp.array_equal(_as_u8(a), _as_u8(b))


def pad_layer(spec: LayerSpec, layer):
    """The layer's bytes zero-padded to ``spec.shapes(padded=True)`` as vLLM 0.33 pads
    (``align_fp4_moe_hidden_dim_for_fi``, ``align_fp4_moe_weights_for_fi``): each half of
    gated w13 gets zero rows up to ``padded_i``, w2 zero columns; w13 zero columns and w2
    zero rows up to ``padded_h``. Written with ``jnp.pad``, apart from ``_layout``'s."""
    e, i = spec.experts, spec.intermediate
    ip, hp = spec.padded_i, spec.padded_h

    def rows13(x):
        if spec.gated:
            x = x.reshape(e, 2, i, x.shape[-1])
            return jnp.pad(x, ((0, 0), (0, 0), (0, ip - i), (0, 0))).reshape(e, 2 * ip, -1)
        return jnp.pad(x, ((0, 0), (0, ip - i), (0, 0)))

    def cols(x, c):
        return jnp.pad(x, ((0, 0), (0, 0), (0, c - x.shape[2])))

    def rows(x, r):
        return jnp.pad(x, ((0, 0), (0, r - x.shape[1]), (0, 0)))

    w13, s13, w2, s2 = (_as_u8(x) for x in layer)
    return [cols(rows13(w13), hp // 2), cols(rows13(s13), hp // 16),
            rows(cols(w2, ip // 2), hp), rows(cols(s2, ip // 16), hp)]


class Reference:
    """The prepared layer from the reference's index formulas, computed in numpy on the
    host, a chunk of experts at a time (on the zero-padded bytes where the layer needs
    padding), and kept on the device one array per expert for :meth:`check`."""

    CHUNK_BYTES = 256 << 20  # host bytes per chunk of experts

    def __init__(self, spec: LayerSpec, layer):
        # On the host: independent of XLA, and no device memory beyond the result (device
        # gathers over a whole array materialize int32 indices of 4x its size).
        self.spec = spec
        padded = LayerSpec(spec.experts, spec.padded_h, spec.padded_i, spec.gated)
        p13 = _reference.w13_row_index(padded.shapes(padded=False)[0][1], gated=spec.gated)
        p2 = _reference.shuffle_index(padded.hidden)
        shapes = padded.shapes(padded=False)
        swz = [None, _swizzle_index(*shapes[1][1:]), None, _swizzle_index(*shapes[3][1:])]
        rows = [p13, p13, p2, p2]
        padded_layer = pad_layer(spec, layer)
        step = max(1, self.CHUNK_BYTES // (padded.nbytes // spec.experts))
        device = next(iter(layer[0].devices()))
        self.out = [[], [], [], []]
        for e0 in range(0, spec.experts, step):
            for k, x in enumerate(padded_layer):
                host = np.asarray(x[e0:e0 + step])[:, rows[k], :]
                if swz[k] is not None:  # out.flat[o] = in.flat[idx[o]] per expert
                    host = host.reshape(len(host), -1)[:, swz[k]].reshape(host.shape)
                self.out[k].extend(jax.device_put(h, device) for h in host)
            if e0 == 0:  # the formulas here against the numpy reference, on the first chunk
                first = [np.asarray(x[:min(step, 2)]) for x in padded_layer]
                for name, got, want in zip(NAMES4, self.out, _reference.prepare_layer(
                        *first, gated=spec.gated, hidden_alignment=128)):
                    if not np.array_equal(np.stack([np.asarray(g) for g in got[:len(want)]]),
                                          want.reshape(len(want), *got[0].shape)):
                        raise AssertionError(f"bench reference disagrees with numpy on {name}")
        del padded_layer
        self.out = jax.block_until_ready(self.out)

    def check(self, outs, what: str) -> None:
        for name, got, want in zip(NAMES4, outs, self.out):
            if (tuple(got.shape) != (len(want), *want[0].shape)
                    or not all(bool(_equal(got[e], w)) for e, w in enumerate(want))):
                raise AssertionError(f"{what}: {name} differs from the reference; not timed")


def device_timer(program, donate: bool):
    """One call of a jitted layer ``program`` timed on the GPU: a function of the program's
    arguments that returns the milliseconds between CUDA events recorded on XLA's stream
    just before its first and after its last kernel (None off CUDA or without torch).

    Two ``buffer_callback`` markers bracket the program, ordered by data dependence
    (``optimization_barrier``), so host dispatch and synchronization are left out:
    what the device spends, where wall-clock time also counts JAX's fixed costs.
    """
    from jax.experimental.buffer_callback import buffer_callback
    try:
        import torch
    except ImportError:
        return None
    if jax.devices()[0].platform != "gpu":
        return None
    events = []

    def mark(ctx, out, *args):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.ExternalStream(ctx.stream))
        events.append(ev)

    token = jax.ShapeDtypeStruct((1,), jnp.uint8)

    def timed(*xs):
        t = buffer_callback(mark, token, has_side_effect=True)(*xs)
        t, xs = jax.lax.optimization_barrier((t, xs))
        outs = program(*xs)
        t = buffer_callback(mark, token, has_side_effect=True)(t, *outs)
        return jax.lax.optimization_barrier((t, outs))[1]

    f = jax.jit(timed, donate_argnums=(0, 1, 2, 3) if donate else ())

    def once(*args):
        events.clear()
        jax.block_until_ready(f(*args))
        if len(events) != 2:
            return None
        events[1].synchronize()
        return events[0].elapsed_time(events[1])

    return once


def device_time(program, donate: bool, make_args, repeats: int):
    """Median GPU milliseconds of a jitted layer ``program`` (:func:`device_timer`) over
    ``repeats`` calls after two warm-up calls; None off CUDA or without torch."""
    once = device_timer(program, donate)
    if once is None:
        return None
    samples = []
    for k in range(2 + repeats):
        args = jax.block_until_ready(make_args())
        ms = once(*args)
        del args
        if k >= 2 and ms is not None:
            samples.append(ms)
    return statistics.median(samples) if samples else None


# --- implementations ---------------------------------------------------------------------------

def _variants(device):
    """``(label, backend, triton route)`` of every jax_nvfp4 implementation timed here."""
    out = [("auto", "auto", None), ("xla", "xla", None)]
    if _triton.missing() is None and (device.platform == "gpu" or _triton.interpreting()):
        route = _triton.route()
        out.append(("triton", "triton", route))
        if route == "xla":  # the buffer_callback route beside it: the fixed cost it saves
            out.append(("triton via buffer_callback", "triton", "callback"))
    if device.platform == "gpu" and _flashinfer.missing() is None:
        out.append(("flashinfer", "flashinfer", None))
    return out


SMALL_LAYER_ROUNDS = 30  # rounds for layers under 1 GiB: their calls are short and noisy


def rounds_for(spec: LayerSpec, repeats: int, small: int = SMALL_LAYER_ROUNDS) -> int:
    """Timed rounds of a layer: ``repeats``, at least ``small`` under 1 GiB (there a call is
    a fraction of a millisecond and its fixed cost varies from call to call: five samples
    did not tell two runs of the same program apart within 1.3-1.5x, H200, 77ed9ab)."""
    return repeats if spec.nbytes >= 1 << 30 else max(repeats, small)


class _Variant:
    """One jax_nvfp4 implementation of one layer, donated or not: its call, checked
    against the reference before it is timed."""

    def __init__(self, spec, layer, name, backend, route, donate):
        self.spec, self.layer, self.name, self.backend, self.donate = \
            spec, layer, name, backend, donate
        # One options object for every call, set around the call only where it differs from
        # the defaults: a new object each call (``options.override``) would time the
        # bench's own cost (a replace, and the plan's key compared field by field), not
        # what a caller under fixed options pays.
        self.options = (None if route is None else
                        dataclasses.replace(_options.current(), triton_route=route))
        self.label = f"{name} donate={donate}"
        self.wall, self.device = [], []
        self.timer = None

    def make(self):
        return [_copy(x) for x in self.layer] if self.donate else list(self.layer)

    def _in_options(self):
        return contextlib.nullcontext() if self.options is None else _options.using(self.options)

    def _prepare_layer(self, *xs):
        return _layer.prepare_layer(*xs, gated=self.spec.gated, backend=self.backend,
                                    donate=self.donate)

    def call(self, *xs):
        with self._in_options():
            return self._prepare_layer(*xs)

    def plan(self):
        with self._in_options():
            return _prepare.plan_job(self.layer, gated=self.spec.gated, donate=self.donate,
                                     backend=self.backend, chunk_bytes=None, inverse=False)

    def check(self, ref):
        out = self.call(*self.make())
        ref.check(out, f"jax_nvfp4 {self.label}")
        del out
        self.timer = device_timer(self.plan().program, self.donate)

    def time_wall(self) -> None:
        args = jax.block_until_ready(self.make())
        with self._in_options():  # (set outside the timed call)
            t0 = time.perf_counter()
            jax.block_until_ready(self._prepare_layer(*args))
            self.wall.append(time.perf_counter() - t0)

    def time_device(self) -> None:
        if self.timer is not None:
            args = jax.block_until_ready(self.make())
            ms = self.timer(*args)
            if ms is not None:
                self.device.append(ms)

    def row(self, device):
        # Transient: polled peak over the inputs during one call, and XLA's own count.
        args = jax.block_until_ready(self.make())
        with _Poller(device) as poll:
            jax.block_until_ready(self.call(*args))
        del args
        job = self.plan()
        if isinstance(job.program, _prepare.OneArrayAtATime):  # padded, donated
            analysed = job.program.transient_bytes(*self.layer)
        else:
            stats = job.program.lower(*self.layer).compile().memory_analysis()
            analysed = stats.temp_size_in_bytes + stats.output_size_in_bytes \
                - stats.alias_size_in_bytes
        impl = f"jax_nvfp4 {self.name} {'donated' if self.donate else 'not donated'}"
        if self.backend == "auto":
            impl += f" (-> {job.backend})"
        gpu_ms = statistics.median(self.device) if self.device else None
        return (impl, _median_ms(self.wall), max(poll.extra, analysed), gpu_ms)


def _failed(label: str, variant, error: Exception) -> None:
    """Report a variant that raised (wrong bytes or an error): it is not timed."""
    print(f"FAILED: {label} jax_nvfp4 {variant.label}: {type(error).__name__}: "
          f"{str(error)[:2000]}", flush=True)
    FAILURES.append(f"{label} {variant.label}: {type(error).__name__}")


def _interleaved(variants, step: str, rounds: int, warmup: int, label: str) -> list:
    """``rounds`` after ``warmup`` rounds, each calling every variant's ``step`` once, in
    an order drawn afresh each round (seeded): drift in the machine's state (clocks,
    allocator, other processes) and the cost of following another variant land on every
    variant alike, so their medians compare. In a fixed or rotated order ``auto`` mostly
    followed the buffer_callback variant, and tiny's ``auto`` measured 1.13-1.19x the same
    XLA program as ``xla`` on the H200. A variant that raises is dropped (reported)."""
    alive = list(variants)
    order = np.random.default_rng(0)
    for r in range(warmup + rounds):
        for v in [alive[k] for k in order.permutation(len(alive))]:
            if v not in alive:
                continue
            samples = getattr(v, "wall" if step == "time_wall" else "device")
            n = len(samples)
            try:
                getattr(v, step)()
            except Exception as e:  # noqa: BLE001 - one failing variant: say so, go on
                _failed(label, v, e)
                alive.remove(v)
                continue
            if r < warmup:
                del samples[n:]
    return alive


def _jax_rows(spec, layer, ref, rounds, device, label, skip=()):
    """Every jax_nvfp4 variant of one layer, checked, then timed round by round
    (:func:`_interleaved`): wall clock, then device time, ``rounds`` each."""
    rows = []
    for donate in (True, False):
        variants = []
        for name, backend, route in _variants(device):
            if backend in skip:
                continue
            v = _Variant(spec, layer, name, backend, route, donate)
            try:
                v.check(ref)
            except Exception as e:  # noqa: BLE001 - one failing variant: say so, go on
                _failed(label, v, e)
                continue
            variants.append(v)
        variants = _interleaved(variants, "time_wall", rounds, 1, label)
        variants = _interleaved(variants, "time_device", rounds, 2, label)
        for v in variants:
            try:
                rows.append(v.row(device))
            except Exception as e:  # noqa: BLE001
                _failed(label, v, e)
        del variants
    return rows


FAILURES: list[str] = []  # variants that raised (wrong bytes or errors): not timed


def _torch_interleave(torch, device):
    if device.platform == "gpu":
        import flashinfer
        return flashinfer.block_scale_interleave

    def interleave(src):  # CPU stand-in: the same formula (flashinfer's kernel is CUDA only)
        r, c = src.shape[-2:]
        x = src.reshape(-1, r // 128, 4, 32, c // 4, 4)
        return x.permute(0, 1, 4, 3, 2, 5).reshape(-1)
    return interleave


def _padded(torch, spec, unpadded, fn, src):
    """``fn`` run on the zero-padded layer: each call pads ``unpadded`` into new zeroed
    buffers first (as vLLM 0.33's ``align_fp4_moe_weights_for_fi``), kept in ``src``."""
    e, i, ip = spec.experts, spec.intermediate, spec.padded_i

    def call():
        for k, (x, shape) in enumerate(zip(unpadded, spec.shapes(padded=True))):
            out = torch.zeros(shape, dtype=torch.uint8, device=x.device)
            if k < 2 and spec.gated:
                out.view(e, 2, ip, -1)[:, :, :i, :x.shape[2]].copy_(x.view(e, 2, i, -1))
            else:
                out[:, :x.shape[1], :x.shape[2]].copy_(x)
            src[k] = out
        return fn()
    return call


def _torch_rows(spec, layer, ref, repeats):
    import torch
    from flashinfer.fused_moe import core as fi_core

    import torch_bridge
    device = next(iter(layer[0].devices()))
    interleave = _torch_interleave(torch, device)
    src = [torch_bridge.to_torch(x) for x in layer]  # zero-copy uint8 views
    unpadded = src
    if spec.needs_padding:  # shapes for the permute indices (refilled by each call)
        src = [torch.empty(s, dtype=torch.uint8, device=src[0].device)
               for s in spec.shapes(padded=True)]
    e = spec.experts
    cache: dict = {}
    idx = [fi_core._maybe_get_cached_w3_w1_permute_indices(cache, src[0][0], 128,
                                                            is_gated_act_gemm=spec.gated),
           fi_core._maybe_get_cached_w3_w1_permute_indices(cache, src[1][0], 128,
                                                            num_elts_per_sf=16,
                                                            is_gated_act_gemm=spec.gated),
           fi_core.get_w2_permute_indices_with_cache(cache, src[2][0], 128),
           fi_core.get_w2_permute_indices_with_cache(cache, src[3][0], 128, num_elts_per_sf=16)]
    idx = [i.to(src[0].device) for i in idx]

    def before():  # sglang before PR #26861 (and flashinfer's test helper)
        lists = ([], [], [], [])
        for k in range(e):
            for a, (lst, x, i) in enumerate(zip(lists, src, idx)):
                v = x[k][i].contiguous()
                lst.append(interleave(v) if a in (1, 3) else v)
        return [torch.stack(lst).reshape(x.shape) for lst, x in zip(lists, src)]

    def after():  # sglang after PR #26861 / vLLM 0.33: preallocated, index_select(out=)
        outs = [torch.empty_like(x) for x in src]
        scratch = [None, torch.empty_like(src[1][0]), None, torch.empty_like(src[3][0])]
        for k in range(e):
            for a, (o, x, i) in enumerate(zip(outs, src, idx)):
                if a in (1, 3):
                    torch.index_select(x[k], 0, i, out=scratch[a])
                    o[k].view(-1).copy_(interleave(scratch[a]))
                else:
                    torch.index_select(x[k], 0, i, out=o[k])
        return outs

    cuda = src[0].is_cuda
    rows = []
    if spec.needs_padding:  # vLLM pads first (new zeroed buffers), then prepares those
        before = _padded(torch, spec, unpadded, before, src)
        after = _padded(torch, spec, unpadded, after, src)
    for label, fn in (("torch sglang-before (list+stack)", before),
                      ("torch sglang-after/vLLM (index_select out=)", after)):
        out = fn()
        ref.check([torch_bridge.from_torch(o.contiguous()) for o in out], label)
        del out
        samples, transient = [], 0
        for k in range(1 + repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                out = fn()
                t1.record()
                torch.cuda.synchronize()
                dt = t0.elapsed_time(t1) / 1e3
                transient = max(transient, torch.cuda.max_memory_allocated() - base)
            else:
                t = time.perf_counter()
                out = fn()
                dt = time.perf_counter() - t
                transient = spec.nbytes  # the outputs (CPU has no allocator counters)
            del out
            if k:
                samples.append(dt)
        ms = _median_ms(samples)
        rows.append((label, ms, transient, ms if cuda else None))
    src.clear()  # drop the torch views of the JAX buffers
    unpadded.clear()
    if cuda:
        torch.cuda.empty_cache()  # hand torch's cached blocks back for JAX
    return rows


def _swizzle_rows(spec, layer, ref, repeats, device):
    """The scale swizzle alone on w13's scale bytes: XLA transpose vs flashinfer's kernel."""
    from ..layout import index as _layout
    s13 = jax.block_until_ready(_as_u8(jnp.stack(ref.out[1])))  # any bytes; swizzle the reference's
    want = jax.jit(lambda x: jnp.take(x.reshape(x.shape[0], -1), jnp.asarray(
        _swizzle_index(*x.shape[1:])), axis=1))(s13)
    rows = []
    xla = jax.jit(_layout.swizzle_scales)
    if not bool(jnp.array_equal(xla(s13).reshape(want.shape), want)):
        raise AssertionError("xla swizzle differs from the reference")
    rows.append(("swizzle only: xla", _median_ms(time_jax(xla, lambda: (s13,), repeats)), 0))
    if device.platform == "gpu" and _flashinfer.missing() is None:
        import flashinfer
        import torch

        import torch_bridge
        src = torch_bridge.to_torch(s13)
        out = torch.empty(src.numel(), dtype=torch.uint8, device=src.device)
        flashinfer.block_scale_interleave(src, out=out)
        if not bool(jnp.array_equal(torch_bridge.from_torch(out).reshape(want.shape), want)):
            raise AssertionError("flashinfer swizzle differs from the reference")
        samples = []
        for k in range(1 + repeats):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            flashinfer.block_scale_interleave(src, out=out)
            t1.record()
            torch.cuda.synchronize()
            if k:
                samples.append(t0.elapsed_time(t1) / 1e3)
        rows.append(("swizzle only: flashinfer kernel", _median_ms(samples), 0))
        del src, out
        torch.cuda.empty_cache()
    return rows, int(np.prod(s13.shape))


def versions() -> dict:
    """Versions of what the figures depend on (None: not installed)."""
    import importlib.metadata as md
    out = {}
    for name in ("jax", "jaxlib", "torch", "triton", "flashinfer-python", "jax-triton",
                 "jax-tvm-ffi"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def write_rows(path: str, rows: list) -> None:
    """A benchmark script's ``rows`` as JSON at ``path``, with the device, commit and versions."""
    with open(path, "w") as f:
        json.dump({"device": jax.devices()[0].device_kind, "commit": commit(),
                   "versions": versions(), "rows": rows}, f, indent=1)


def commit() -> str | None:
    """The git commit the code ran at: ``JAX_NVFP4_COMMIT`` (a copy without .git), else
    ``git rev-parse`` (suffixed ``-dirty`` with changes to jax_nvfp4/), else None."""
    import os
    import subprocess
    if os.environ.get("JAX_NVFP4_COMMIT"):
        return os.environ["JAX_NVFP4_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                              capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jax_nvfp4"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head.strip() + ("-dirty" if dirty.strip() else "")


def card_name(device) -> str:
    """A file-name form of the device, e.g. ``h200`` for "NVIDIA H200"."""
    kind = device.device_kind.lower().replace("nvidia ", "")
    return "".join(c if c.isalnum() else "-" for c in kind).strip("-") or device.platform


def floor_bytes(spec: LayerSpec) -> int:
    """Bytes a copy would move: the layer read (unpadded) and written (padded)."""
    return spec.nbytes + sum(int(np.prod(s)) for s in spec.shapes(padded=True))


@jax.jit
def _rolled(x, k):
    return jnp.roll(x, k, 0)


@jax.jit
def _equal_rolled(got, want, k):
    return jnp.array_equal(_as_u8(got), jnp.roll(_as_u8(want), k, 0))


def whole_model(name: str, shape, layers: int, device, bw: float) -> dict:
    """``prepare(params)`` over ``layers`` random layers of ``shape`` (donated, in one
    call; its program compiled beforehand on one more layer), and the same layers by a loop
    of ``prepare_layer``; every layer then checked against the reference. Returns the two
    rows.

    Layer ``k`` is one random layer with its experts rolled by ``k`` (every expert's bytes
    move alike, so its reference is the reference's experts rolled by ``k``): one host
    reference for the model instead of one a layer (a DeepSeek-V3 TP8 layer's took seconds),
    and a layer put in another's place fails its check (``layers`` up to E)."""
    from ..tree import prepare as _tree
    e, h, i, gated = shape
    spec = LayerSpec(e, h, i, gated)
    if layers > e:
        raise UserError(f"--model {name}:{layers}: at most E = {e} layers (each is the layer "
                        "with its experts rolled by its index)")
    base = random_device_layer(jax.random.key(5000), e, h, i, gated=gated, device=device)
    ref = Reference(spec, base)
    want = [jnp.stack(w) for w in ref.out]  # the reference, one array each
    del ref

    def layer(k):
        return dict(zip(NAMES, (_rolled(x, k) for x in base)))

    jax.block_until_ready(_tree.prepare({"warm-up": layer(0)}, gated=gated))  # compile
    floor_ms = 1e3 * layers * floor_bytes(spec) / bw
    out_rows = []
    # The same layers through prepare(params), then through a loop of prepare_layer calls
    # (what prepare adds over the per-layer calls).
    for impl in ("prepare(params)", "prepare_layer loop"):
        params = {f"layers.{k}.mlp.experts": layer(k) for k in range(layers)}
        jax.block_until_ready(params)
        with _Poller(device) as poll:
            t0 = time.perf_counter()
            if impl == "prepare(params)":
                out = _tree.prepare(params, gated=gated)
            else:
                out = {key: dict(zip(NAMES, _layer.prepare_layer(
                    *(v[n] for n in NAMES), gated=gated))) for key, v in params.items()}
            out = jax.block_until_ready(out)
            seconds = time.perf_counter() - t0
        del params
        for k in range(layers):  # every layer bit-exact before the time counts
            got = out.pop(f"layers.{k}.mlp.experts")
            for n, w in zip(NAMES, want):
                if tuple(got[n].shape) != tuple(w.shape) or not bool(_equal_rolled(got[n], w, k)):
                    raise AssertionError(f"{impl} layer {k}: {n} differs from the reference; "
                                         "not timed")
            del got
        out_rows.append(dict(shape=name, E=e, H=h, I=i, gated=gated, layers=layers,
                             impl=f"jax_nvfp4 {impl} donated", ms=1e3 * seconds,
                             ms_per_layer=1e3 * seconds / layers,
                             x_floor=1e3 * seconds / floor_ms, transient_bytes=int(poll.extra),
                             model_bytes=layers * spec.nbytes))
    return out_rows


def run(args) -> int:
    device = jax.devices()[0]
    shapes = ([_parse_shape(s) for s in args.shape] if args.shape else [] if args.model else
              list((CPU_SHAPES if args.cpu else SHAPES).items()))
    models = []
    for m in args.model or ():
        shape, _, count = m.partition(":")
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--model {m!r}: expected NAME:LAYERS, e.g. qwen3-30b-a3b:48")
        models.append((*_parse_shape(shape), int(count)))
    repeats = args.repeats or (2 if args.cpu else 10)
    if repeats < 1:
        raise UserError("--repeats must be at least 1")
    largest = max([LayerSpec(*s).nbytes for _, s in shapes]
                  + [LayerSpec(*s).nbytes for _, s, _ in models])
    bw = copy_bandwidth(device, min(max(largest, 1 << 24), 2 << 30), repeats)
    meta = dict(device=f"{device.device_kind} ({device.platform})", card=card_name(device),
                date=time.strftime("%Y-%m-%d", time.gmtime()), commit=commit(),
                versions=versions(), triton_route=_triton.route()
                if _triton.missing() is None else None, copy_GBps=bw / 1e9, repeats=repeats)
    print(f"device: {device.device_kind} ({device.platform}); copy bandwidth "
          f"{bw / 1e9:.0f} GB/s (read + write); commit {meta['commit']}; {meta['versions']}")
    rows, model_rows = [], []
    paths = [args.out] if args.out else []
    stem = None
    if args.out_dir:
        import os
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, f"{meta['card']}-{meta['date']}-{meta['commit']}")
        paths.append(stem + ".json")

    def save(final: bool):  # after every shape too: a run cut short keeps what it measured
        result = dict(meta, complete=final, rows=rows, models=model_rows,
                      auto=auto_summary(rows), failures=FAILURES)
        for path in paths:
            with open(path, "w") as f:
                json.dump(result, f, indent=1)

    have_torch = args.torch and _flashinfer.missing() is None
    for k, (name, (e, h, i, gated)) in enumerate(shapes):
        spec = LayerSpec(e, h, i, gated)
        layer = random_device_layer(jax.random.key(1000 + k), spec.experts, spec.hidden,
                                    spec.intermediate, gated=spec.gated, device=device)
        ref = Reference(spec, layer)
        floor_ms = 1e3 * floor_bytes(spec) / bw
        rounds = rounds_for(spec, repeats, 0 if args.cpu else SMALL_LAYER_ROUNDS)
        results = _jax_rows(spec, layer, ref, rounds, device, name, args.skip)
        if have_torch:
            results += _torch_rows(spec, layer, ref, max(1, min(repeats, 3)))
        base = dict(shape=name, E=e, H=h, I=i, gated=gated, Hp=spec.padded_h,
                    Ip=spec.padded_i, layer_bytes=spec.nbytes, floor_bytes=floor_bytes(spec))
        for impl, ms, transient, gpu_ms in results:
            rows.append(dict(base, impl=impl, ms=ms, x_floor=ms / floor_ms, device_ms=gpu_ms,
                             device_x_floor=None if gpu_ms is None else gpu_ms / floor_ms,
                             transient_bytes=int(transient)))
        rows.append(dict(base, impl="copy floor", ms=floor_ms, x_floor=1.0,
                         device_ms=floor_ms, device_x_floor=1.0, transient_bytes=0))
        if name in ("deepseek-v3", "cpu-small") or len(shapes) == 1:
            sw, nbytes = _swizzle_rows(spec, layer, ref, repeats, device)
            for impl, ms, transient in sw:
                rows.append(dict(base, impl=impl, ms=ms, layer_bytes=nbytes,
                                 floor_bytes=2 * nbytes, x_floor=ms / (1e3 * 2 * nbytes / bw),
                                 device_ms=None, device_x_floor=None, transient_bytes=0))
        del layer, ref
        save(False)
        print(f"{name}: done", flush=True)
    for name, shape, count in models:
        model_rows.extend(whole_model(name, shape, count, device, bw))
        save(False)
    table = _table(device, bw, rows, model_rows, meta)
    if FAILURES:
        table += "\nFAILED (not timed): " + "; ".join(FAILURES)
    print(table)
    save(True)
    if stem:
        with open(stem + ".md", "w") as f:
            f.write(table + "\n")
    for path in paths:
        print(f"wrote {path}")
    return 1 if FAILURES else 0


def auto_summary(rows) -> list[dict]:
    """Per shape and donation: auto's wall time over the best jax_nvfp4 backend's (and its
    device time over the best device time, where measured)."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for donated in ("donated", "not donated"):
            mine = [r for r in rows if r["shape"] == shape and r["impl"].startswith("jax_nvfp4 ")
                    and (" not donated" in r["impl"]) == (donated == "not donated")]
            auto = [r for r in mine if r["impl"].startswith("jax_nvfp4 auto ")]
            rest = [r for r in mine if not r["impl"].startswith("jax_nvfp4 auto ")]
            if auto and rest:
                best = min(rest, key=lambda r: r["ms"])
                row = dict(shape=shape, donated=donated == "donated", auto=auto[0]["impl"],
                           auto_ms=auto[0]["ms"], best=best["impl"], best_ms=best["ms"],
                           ratio=auto[0]["ms"] / best["ms"])
                timed = [r for r in rest if r.get("device_ms") is not None]
                if auto[0].get("device_ms") is not None and timed:
                    dbest = min(timed, key=lambda r: r["device_ms"])
                    row.update(auto_device_ms=auto[0]["device_ms"], best_device=dbest["impl"],
                               best_device_ms=dbest["device_ms"],
                               device_ratio=auto[0]["device_ms"] / dbest["device_ms"])
                out.append(row)
    return out


def _table(device, bw, rows, model_rows=(), meta=None) -> str:
    lines = [f"\n{device.device_kind}: copy {bw / 1e9:.0f} GB/s; floor = the layer read "
             "(unpadded) and written (padded) at that bandwidth; ms = wall clock of the whole "
             "call (JAX: prepare_layer to block_until_ready); device ms = CUDA events on the "
             "stream around the work; transient = peak extra device memory during the call over "
             "the inputs (JAX: polled bytes_in_use / XLA memory analysis; torch: "
             "max_memory_allocated)"]
    if meta:
        lines.append(f"commit {meta['commit']}, {meta['date']}, triton route "
                     f"{meta['triton_route']}; " + ", ".join(
                         f"{k} {v}" for k, v in meta["versions"].items() if v))
    lines += ["| shape (E, H, I) | implementation | ms | x floor | device ms | x floor | "
              "transient |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = r["transient_bytes"] / r["layer_bytes"]
        dev = ("- | -" if r["device_ms"] is None else
               f"{r['device_ms']:.3f} | {r['device_x_floor']:.2f}x")
        pad = "" if (r.get("Hp"), r.get("Ip")) in ((r["H"], r["I"]), (None, None)) else \
            f" -> ({r['Hp']}, {r['Ip']})"
        gated = "" if r.get("gated", True) else ", not gated"
        lines.append(f"| {r['shape']} ({r['E']}, {r['H']}, {r['I']}){pad}{gated} | {r['impl']} | "
                     f"{r['ms']:.3f} | {r['x_floor']:.2f}x | {dev} | "
                     f"{r['transient_bytes'] / 2**20:.0f} MiB ({share:.0%}) |")
    for r in model_rows:
        lines.append(f"\nwhole model: {r['layers']} layers of {r['shape']} ({r['E']}, {r['H']}, "
                     f"{r['I']}), {r['model_bytes'] / 2**30:.1f} GiB: {r['impl']} "
                     f"{r['ms']:.1f} ms = {r['ms_per_layer']:.3f} ms per layer, "
                     f"{r['x_floor']:.2f}x floor, transient {r['transient_bytes'] / 2**20:.0f} MiB")
    for a in auto_summary(rows):
        line = (f"auto vs best, {a['shape']} {'donated' if a['donated'] else 'not donated'}: "
                f"{a['auto_ms']:.3f} ms vs {a['best']} {a['best_ms']:.3f} ms = {a['ratio']:.2f}x")
        if "device_ratio" in a:
            line += (f"; device {a['auto_device_ms']:.3f} ms vs {a['best_device']} "
                     f"{a['best_device_ms']:.3f} ms = {a['device_ratio']:.2f}x")
        lines.append(line)
    return "\n".join(lines)
