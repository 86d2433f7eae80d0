"""The chunked in-place program of one layer: validation, the chunk budget, the backend's
program, the compile cache, and the planned call (``plan_job`` / ``run_job``, shared by
``layer.prepare_layer``, ``tree.prepare`` and ``checkpoint.load``).

With donation the work runs in place: a loop over chunks of
experts (unrolled, or a ``lax.fori_loop``) reads one chunk, transforms it and writes it back with
``lax.dynamic_update_slice`` into the donated buffer, so the only extra
device memory is one chunk. Without donation it is one out-of-place
transform per array (fastest; the caller keeps the inputs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
from jax import lax
import numpy as np

from . import options as _options
from .backends import flashinfer, select, xla
from .backends.triton import program as triton
from .backends.triton.tiles import w13_by_cycles, w13_in_one_pass
from .layout.spec import (BLOCK, DEFAULT_HIDDEN_ALIGNMENT, NAMES, SCALE_DTYPE, LayerSpec,
                          check_arrays, deleted_error)
from .options import Options
from .tree import marks as _marks, sharding as _sharding

Transform = Callable[[jax.Array], jax.Array]


def _chunked(x, fn: Transform, chunk: int, write=None, unroll: bool = False):
    """``fn`` applied to ``x`` chunk by chunk of ``chunk`` experts, written back into ``x``.

    ``fn`` must keep the shape. Under donation XLA updates the buffer in place,
    so the scratch is one chunk. Each chunk reads the buffer the previous one
    wrote, so XLA runs them in order and reuses one scratch.
    """
    def step(start, size, buf):
        block = lax.dynamic_slice_in_dim(buf, start, size, axis=0)
        if write is not None:
            return write(buf, start, block)
        return lax.dynamic_update_slice_in_dim(buf, fn(block), start, axis=0)

    n, tail = divmod(x.shape[0], chunk)
    if unroll or write is not None:  # write needs static offsets
        for k in range(n):
            # The barrier keeps XLA from reading later chunks from the buffer
            # before this write (slice-of-update simplification), which would
            # keep every chunk's scratch alive at once.
            x = lax.optimization_barrier(step(k * chunk, chunk, x))
    elif n:
        x = lax.fori_loop(0, n, lambda k, buf: step(k * chunk, chunk, buf), x)
    if tail:
        x = step(n * chunk, tail, x)
    return x


def free_bytes(device) -> int | None:
    """Free memory on ``device`` (None where the platform does not say)."""
    try:
        stats = device.memory_stats() if device.platform != "cpu" else None
    except Exception:  # noqa: BLE001 - memory_stats is best effort on every platform
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))


def default_chunk_bytes(spec: LayerSpec, free: int | None = None,
                        options: Options | None = None) -> int:
    """The scratch budget used when ``chunk_bytes`` is None.

    ``1/layer_share`` of the layer, at least ``min_chunk_bytes``, at most
    ``1/free_share`` of the device's free memory (when known): the ``options``.
    """
    o = options or _options.current()
    budget = _layer_budget(spec, o.layer_share, o.min_chunk_bytes)
    if free is not None and free // o.free_share < budget:
        # A power of two, so layers prepared as free memory shrinks share programs.
        budget = 1 << max(0, (free // o.free_share).bit_length() - 1)
    return max(1, budget)


@functools.lru_cache(maxsize=256)
def _layer_budget(spec: LayerSpec, layer_share: int, min_chunk_bytes: int) -> int:
    return max(spec.nbytes // layer_share, min_chunk_bytes)


def _budget(spec: LayerSpec, chunk_bytes, free, options) -> int:
    """The scratch budget in bytes: ``chunk_bytes`` validated, or the default."""
    if chunk_bytes is None:
        return default_chunk_bytes(spec, free, options)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, np.integer)) \
            or chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return int(chunk_bytes)


def experts_per_chunk(spec: LayerSpec, chunk_bytes: int | None,
                      free: int | None = None, *, w13_together: bool = False,
                      options: Options | None = None) -> tuple[int, ...]:
    """Experts per chunk for each of the four arrays, so a chunk is at most ``chunk_bytes``.

    Chunks are made as even as possible (``E = n * chunk + tail`` with a small tail).
    ``w13_together``: w13 and its scales share one chunk count, sized by their bytes
    together (the triton backend moves them through one scratch at once).
    """
    return _experts_per_chunk(spec, _budget(spec, chunk_bytes, free, options), w13_together)


@functools.lru_cache(maxsize=1024)
def _experts_per_chunk(spec: LayerSpec, budget: int, w13_together: bool) -> tuple[int, ...]:
    e = spec.experts
    per = [math.prod(shape[1:]) for shape in spec.shapes(padded=True)]
    if w13_together:
        per[0] = per[1] = per[0] + per[1]
    out = []
    for per_expert in per:
        most = max(1, min(e, budget // per_expert))
        n_chunks = -(-e // most)
        out.append(-(-e // n_chunks))
    return tuple(out)


def layer_program(spec: LayerSpec, *, inverse: bool, chunks: tuple[int, ...] | None,
                  backend: str = "xla", pallas: bool = False, crop=None,
                  options: Options | None = None):
    """The pure function of four arrays that prepares (or unprepares) one layer.

    ``chunks=None`` transforms each array whole (out of place); otherwise each
    array is transformed chunk by chunk into itself (in place when donated).
    It works on any number of experts as long as ``spec`` says so; the
    sharded path calls it per device on the local experts. ``backend`` is a
    resolved backend (``"xla"`` or ``"flashinfer"``: its ``transforms``). ``pallas`` moves
    the weight rows with Pallas kernels (CUDA; see ``backends.pallas``). ``crop`` (inverse
    only): the valid per-device ``(H, I)`` the result is cut back to (out of place).
    ``options``: ``fuse_scales`` and ``unroll`` (default: the current options).
    """
    o = options or _options.current()
    if backend == "flashinfer" and not inverse:
        fns = flashinfer.transforms(spec, pallas=pallas, fuse_scales=o.fuse_scales)
    else:
        fns = xla.transforms(spec, inverse=inverse, pallas=pallas, crop=crop,
                             fuse_scales=o.fuse_scales)
    if chunks is not None and (spec.needs_padding if not inverse else crop is not None):
        raise ValueError("padding changes shapes: a padded layer cannot be prepared in place")

    def program(*arrays):
        # Dtypes are kept: a bitcast between uint8 and float8 is a full copy in
        # XLA, which would break the one-chunk bound.
        if chunks is None:
            return tuple(fn(x) for x, (fn, _) in zip(arrays, fns))
        outs = []
        for x, (fn, write), c in zip(arrays, fns, chunks):
            if outs:
                # One array after the other, so their chunks never need scratch at once.
                x = lax.optimization_barrier((outs[-1], x))[1]
            outs.append(_chunked(x, fn, c, write, o.unroll))
        return tuple(outs)

    return program


def compiled(spec: LayerSpec, *, inverse: bool, donate: bool, chunks, backend: str = "xla",
             pallas: bool = False, plan=None, crop=None, via: str | None = None,
             options: Options | None = None):
    """The jitted program of one (per-device ``spec``) layer, compiled once per arguments:
    the ``options`` (default: the current ones) are part of the key, so a changed knob
    never reuses a program compiled under others. What ``plan_job`` runs; tests call it
    to inspect a program. ``backend`` is resolved (not ``"auto"``); ``via`` (Triton): the
    route; ``plan``: the sharding plan (``tree.sharding``); ``crop``: as ``layer_program``.
    """
    return _compiled(spec, inverse, donate, chunks, backend, pallas, plan, crop, via,
                     options or _options.current())


class OneArrayAtATime:
    """The program of a padded layer prepared donated: one jitted program per array, run
    one after another, each input deleted as soon as its result is dispatched, so the
    allocator reuses its memory for the next result (XLA's stream runs them in order).

    Called on tracers (inside another jit, as the bench's device timer does), the four
    are one program. ``steps``: the four jitted programs, each of one array.
    """

    def __init__(self, fns, plan=None):
        self.fns = tuple(fns if plan is None else
                         (_sharding.array_map(f, plan, k) for k, f in enumerate(fns)))
        self.steps = tuple(jax.jit(f) if plan is None else
                           jax.jit(f, out_shardings=plan.shardings[k])
                           for k, f in enumerate(self.fns))

    def __call__(self, *arrays):
        if any(isinstance(x, jax.core.Tracer) for x in arrays):
            return tuple(f(x) for f, x in zip(self.fns, arrays))
        outs = []
        for step, x in zip(self.steps, arrays):
            outs.append(step(x))
            if isinstance(x, jax.Array):
                x.delete()
        return tuple(outs)

    def transient_bytes(self, *arrays) -> int:
        """XLA's count of the peak extra device memory over the inputs: at step ``k`` its
        result and scratch, plus what the results before it grew over their inputs."""
        peak, grown = 0, 0
        for step, x in zip(self.steps, arrays):
            stats = step.lower(x).compile().memory_analysis()
            out = stats.output_size_in_bytes
            peak = max(peak, grown + out + stats.temp_size_in_bytes)
            grown += out - x.nbytes
        return peak


def _array_functions(spec, backend, pallas, via, options):
    """Per array, the function that prepares it out of place (padded) on ``backend``."""
    if backend == "triton":
        return triton.array_programs(spec, via=via or "callback")
    if backend == "flashinfer":
        fns = flashinfer.transforms(spec, pallas=pallas, fuse_scales=options.fuse_scales)
    else:
        fns = xla.transforms(spec, inverse=False, pallas=pallas, fuse_scales=options.fuse_scales)
    return tuple(fn for fn, _ in fns)


@functools.lru_cache(maxsize=64)
def _compiled(spec, inverse, donate, chunks, backend, pallas, plan, crop, via, options):
    # Padding (and cropping it back) changes every shape, so no buffer can be reused:
    # transform out of place and let the caller delete the inputs (one array at a time).
    in_place = donate and (crop is None if inverse else not spec.needs_padding)
    if (donate and not inverse and spec.needs_padding
            and spec.nbytes >= options.one_array_min_bytes):
        return OneArrayAtATime(_array_functions(spec, backend, pallas, via, options), plan)
    if backend == "triton" and not inverse:
        program = triton.layer_program(spec, chunks=chunks if in_place else None,
                                       via=via or "callback")
    else:
        program = layer_program(spec, inverse=inverse, chunks=chunks if in_place else None,
                                backend=backend, pallas=pallas, crop=crop, options=options)
    if plan is not None:  # sharded: the same program on each device's shard (spec is local)
        return _sharding.jit(program, plan, donate=in_place)
    return jax.jit(program, donate_argnums=(0, 1, 2, 3) if in_place else ())


_to_float8 = jax.jit(lambda x: lax.bitcast_convert_type(x, SCALE_DTYPE), donate_argnums=0)


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and a Job is
# made on every call (about 2 us of a tiny call's planning on CPU).
@dataclasses.dataclass(slots=True)
class Job:
    """A validated call: the per-device ``spec``, the ``chunks`` and the jitted ``program``."""

    arrays: tuple
    spec: LayerSpec
    chunks: tuple[int, ...]
    program: Callable
    donate: bool
    inverse: bool
    valid: LayerSpec | None = None  # the whole layer's sizes (``spec`` is per device)
    backend: str = "xla"  # the resolved backend (``"auto"`` decided)
    check_copies: bool | None = None  # the marks' check: the option, False where it is moot


def _valid_size(name: str, value, *, most: int, caller: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{caller}: {name} must be an int or None, got {value!r}")
    if value <= 0 or value % BLOCK or value > most:
        raise ValueError(f"{caller}: {name} = {value} must be a positive multiple of {BLOCK} "
                         f"and at most the prepared size {most}")
    return int(value)


def _crop_sizes(valid: LayerSpec, local: LayerSpec, hidden_size, intermediate_size,
                caller: str):
    """The per-device ``(H, I)`` that unprepare crops back to (None: no crop)."""
    h = valid.hidden if hidden_size is None else _valid_size(
        "hidden_size", hidden_size, most=valid.hidden, caller=caller)
    if intermediate_size is None:
        i_local = local.intermediate
    else:
        i = _valid_size("intermediate_size", intermediate_size, most=valid.intermediate,
                        caller=caller)
        tp = valid.intermediate // local.intermediate  # devices splitting I (1: unsplit)
        i_local = i // tp
        if i % tp or i_local % BLOCK or dataclasses.replace(
                local, intermediate=i_local).padded_i != local.intermediate:
            raise ValueError(
                f"{caller}: intermediate_size = {i} does not pad to the prepared I = "
                f"{valid.intermediate}" + (f" ({tp} shards of {local.intermediate})" if tp > 1
                                           else "")
                + f": prepare pads I (per device) to a multiple of "
                f"{64 if valid.gated else 128}; pass the layer's own I")
    if (h, i_local) == (local.hidden, local.intermediate):
        return None
    return h, i_local


# What plan_job decided for arrays of one signature (shapes, dtypes, shardings) and one set
# of arguments and options: the checks of shapes and shardings passed, and the backend, spec
# and program they gave, with the chunks and program per scratch budget. A call that matches
# runs only the checks of the arrays themselves (deleted, marked, copies), asks again which
# backends import (decided again if that changed) and reads free memory. Measured
# (benchmarks/fixed_cost.py, tiny layer): planning 0.07-0.2 ms of a 0.3-0.4 ms call before
# any reuse (H200), 0.03-0.06 ms of a 0.12-0.16 ms call with it (H100, 4722b01).
_PLANS: dict = {}
_MAX_PLANS = 256


def _signature(arrays):
    """``(shape, dtype, sharding)`` of each array, or None unless all four are concrete,
    live jax.Arrays (numpy inputs and others take the full path)."""
    out = []
    for x in arrays:
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return None
        out.append((x.shape, x.dtype, x.sharding))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _sharding_on_cuda(sharding) -> bool:
    return all(select.is_cuda(d) for d in sharding.device_set)


def _environment(backend: str, inverse: bool, on_cuda: bool, options: Options):
    """What ``select.resolve_backend`` reads besides the arrays and options, for this call:
    which packages import, the Triton interpreter, the route (tests patch these).
    ``on_cuda``: whether every array is on CUDA devices."""
    if inverse or backend == "xla" or (backend == "auto" and not on_cuda):
        return None
    if backend == "flashinfer":
        return flashinfer.missing()
    interpret = triton.interpreting()
    return (triton.missing(), interpret, triton.route(options, interpret=interpret),
            flashinfer.missing() if backend == "auto" and options.auto_picks_flashinfer else None)


def plan_job(arrays, *, gated, donate, backend, chunk_bytes, inverse, where="",
             hidden_alignment=DEFAULT_HIDDEN_ALIGNMENT, hidden_size=None,
             intermediate_size=None, caller=None) -> Job:
    """Validate one layer's call and build its program; nothing is run or donated.

    Every refusal of :func:`prepare_layer` is raised here, so callers that handle
    many layers (``prepare``, ``load``) can check them all before donating any.
    ``hidden_size``/``intermediate_size`` (inverse only): the valid sizes to crop to.
    The options (``jax_nvfp4.options``) are read once, here. Calls whose arrays and
    arguments match an earlier valid call reuse its decisions (``_PLANS``).
    """
    options = _options.current()
    caller = caller or ("unprepare_layer" if inverse else "prepare_layer")
    arrays = tuple(arrays)
    sig = _signature(arrays) if len(arrays) == 4 else None
    for name, x in zip(NAMES, arrays) if sig is None else ():  # (a signature: no tracers)
        if isinstance(x, jax.core.Tracer):
            raise TypeError(
                f"{caller}() got a tracer for {where}{name}: it cannot run inside jax.jit, "
                "vmap or grad (it donates and marks concrete arrays, and picks its compiled "
                f"program from their sizes, shardings and devices). Call {caller} outside the "
                "traced function, on concrete arrays; it is already one compiled program. To "
                "read prepared weights inside jit, dequantize_layer(..., layout='trtllm') is "
                "jittable."
            )
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {gated!r}")
    if not isinstance(donate, bool):
        raise TypeError(f"donate must be a bool, got {donate!r}")
    if not inverse and (hidden_size is not None or intermediate_size is not None):
        raise TypeError(f"{caller}: hidden_size and intermediate_size are for unprepare_layer")
    key = decided = None
    if sig is not None:
        # Typed: 256.0 == 256 and True == 1, but those are refused, not the same call.
        key = (sig, gated, donate, backend, inverse, options,
               *((type(v), v) for v in (chunk_bytes, hidden_alignment, hidden_size,
                                        intermediate_size)))
        try:
            decided = _PLANS.get(key)
        except TypeError:  # an unhashable argument: it is refused below, with its message
            key = None
        if decided is not None and decided.environment != _environment(
                backend, inverse, decided.on_cuda, options):
            decided = None  # a package or the interpreter came or went: decide again
    if decided is None:
        spec = valid = check_arrays(arrays, gated=gated, prepared=inverse, where=where,
                                    hidden_alignment=hidden_alignment)
    else:
        spec, valid = decided.spec, decided.valid
        for name, x in zip(NAMES, arrays):
            if x.is_deleted():
                raise deleted_error(f"{where}{name}")
    for name, x in zip(NAMES, arrays):
        if not inverse and _marks.is_marked(x):
            raise ValueError(
                f"{where}{name} is already in the TRT-LLM layout (it came out of prepare); "
                "preparing it again would shuffle it twice"
            )
    if len({id(x) for x in arrays}) != 4:
        raise ValueError("the four arrays must be distinct objects")
    # Whether inputs are checked against (and outputs give) fingerprints: False where the
    # option leaves it to the platform and no array is on the CPU (four sharding lookups
    # fewer in the checks and four in the marks, on every call).
    check = options.check_copies
    if check is None and decided is not None and decided.any_on_cpu is False:
        check = False
    if not inverse and check is not False:
        for name, copy in zip(NAMES, _marks.copies(arrays, check)):
            if copy:
                raise ValueError(
                    f"{where}{name} holds the bytes of an array that came out of prepare (a "
                    "copy of a prepared array?); preparing it again would shuffle it twice. "
                    "Use it as prepared, or unprepare_layer it first"
                )
    if decided is None:
        plan = _sharding.plan(arrays, gated=gated, prepared=inverse, where=where,
                              hidden_alignment=hidden_alignment)
        if plan is not None:  # sharded over a mesh: sizes and chunks are per device
            spec = plan.local
        crop = None
        if inverse:
            crop = _crop_sizes(valid, spec, hidden_size, intermediate_size, caller)
        # Last of the checks: "flashinfer" may compile its module (~40 s) on first use.
        choice = select.choose(backend, arrays, spec, donate=donate, inverse=inverse,
                               options=options)
        decided = _Decided(spec, valid, plan, crop, choice,
                           _budget(spec, chunk_bytes, None, options),  # (refused if bad)
                           arrays if sig is not None else None)
        if key is not None:  # (compared when reused)
            decided.environment = _environment(backend, inverse, decided.on_cuda, options)
            if len(_PLANS) >= _MAX_PLANS:
                try:  # the oldest; another thread may be evicting too
                    _PLANS.pop(next(iter(_PLANS)), None)
                except (RuntimeError, StopIteration):
                    pass
            _PLANS[key] = decided
    budget = decided.budget
    if chunk_bytes is None and donate and isinstance(arrays[0], jax.Array):
        device = decided.device if decided.device is not None else next(iter(arrays[0].devices()))
        free = free_bytes(device)
        if free is not None and free // options.free_share < budget:
            budget = default_chunk_bytes(spec, free, options)
    chunks, program = decided.program(budget, donate, inverse, options)
    return Job(arrays, spec, chunks, program, donate, inverse, valid, decided.choice.backend,
               check)


class _Decided:
    """What ``plan_job`` decided for one key of ``_PLANS``: the checked sizes, the sharding
    plan, the crop and the backend; the scratch budget before free memory caps it; for
    arrays of a signature (the key holds their shardings), the device whose free memory is
    read and whether any array is on the CPU (there copies are checked by default); and per
    scratch budget (it follows free memory) the chunks and the compiled program."""

    __slots__ = ("spec", "valid", "plan", "crop", "choice", "budget", "device", "any_on_cpu",
                 "on_cuda", "environment", "_programs")

    def __init__(self, spec, valid, plan, crop, choice, budget, arrays=None):
        self.spec, self.valid, self.plan, self.crop, self.choice = spec, valid, plan, crop, choice
        self.budget = budget
        # None: not known (not a signature's arrays: never reused).
        self.device = self.any_on_cpu = self.on_cuda = self.environment = None
        if arrays is not None:
            self.device = next(iter(arrays[0].devices()))
            self.any_on_cpu = any(_marks.on_cpu(x.sharding) for x in arrays)
            self.on_cuda = all(_sharding_on_cuda(x.sharding) for x in arrays)
        self._programs = {}

    def program(self, budget: int, donate: bool, inverse: bool, options: Options):
        made = self._programs.get(budget)
        if made is None:
            spec, choice = self.spec, self.choice
            together = choice.backend == "triton" and not (w13_in_one_pass(spec)
                                                           or w13_by_cycles(spec))
            chunks = _experts_per_chunk(spec, budget, together)
            made = chunks, compiled(spec, inverse=inverse, donate=donate, chunks=chunks,
                                    backend=choice.backend, pallas=choice.pallas,
                                    plan=self.plan, crop=self.crop, via=choice.via,
                                    options=options)
            if len(self._programs) < 64:  # budgets are powers of two as free memory shrinks
                self._programs[budget] = made
        return made


def run_job(job: Job) -> tuple:
    """Run a planned call: outputs with float8 scales; donated inputs are consumed."""
    outs = list(job.program(*job.arrays))
    for k in (1, 3):
        if outs[k].dtype != SCALE_DTYPE:  # uint8 scale bytes: one copy to float8
            outs[k] = _to_float8(outs[k])
    if job.donate:
        # Consumed even where XLA could not reuse them (padding changes shapes).
        for x in job.arrays:
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
    if not job.inverse:  # (unprepared inputs that stay alive keep their mark)
        _marks.mark(*outs, check=job.check_copies)
    return tuple(outs)
