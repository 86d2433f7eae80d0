"""The knobs of prepare: one frozen options object, read once per call.

Each knob was measured (benchmarks/DESIGN-RECORD.md); the defaults are what those measurements
chose. The object is part of the compile-cache key of ``transform``, so a changed knob
builds its own program and never reuses one compiled under other options. Change knobs
for a block of code (tests, benchmarks) with :func:`override`; the change is local to
the thread or task (``contextvars``) and undone on exit::

    with jax_nvfp4.options.override(pallas=False, triton_route="callback"):
        jax_nvfp4.prepare_layer(...)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os

TRITON_ROUTES = ("auto", "xla", "callback")


@dataclasses.dataclass(frozen=True)
class Options:
    """Every knob of prepare (hashable: a compile-cache key).

    Attributes
    ----------
    layer_share, min_chunk_bytes, free_share : int
        Default scratch per chunk of the in-place loop: ``1/layer_share`` of the layer
        (so the transient stays a few percent of it), at least ``min_chunk_bytes`` (so
        small layers are not cut into many tiny steps), at most ``1/free_share`` of the
        device's free memory.
    unroll : bool
        How the in-place loop runs: unrolled (static offsets, one straight-line program)
        or a ``lax.fori_loop`` (one body, dynamic offsets). benchmarks/DESIGN-RECORD.md.
    fuse_scales : bool
        Scales: row permutation and swizzle fused into one transpose, or two passes.
    pallas : bool
        Weights on CUDA: row permutations as Pallas kernels (16-byte accesses) rather than
        XLA transposes (one byte per thread). benchmarks/DESIGN-RECORD.md.
    triton_min_bytes : int
        Layers (per device) from which ``auto`` may take the Triton kernels: below it their
        launch costs more than they save (``backends.select.auto_takes_triton``).
    triton_route : {"auto", "xla", "callback"}
        How the Triton kernels are launched on CUDA: "auto" (through XLA where jax-triton
        imports, else from a buffer_callback), "xla" or "callback". Default: the
        environment variable ``JAX_NVFP4_TRITON_ROUTE`` at import, else "auto". Measured
        on an H200 (benchmarks/DESIGN-RECORD.md): the same kernels, the XLA route without the
        callback's fixed host cost.
    check_copies : bool or None
        Whether inputs are checked against the fingerprints of prepared arrays: True,
        False, or None (default) for arrays on the CPU (and numpy arrays) only. On a GPU
        the check waits for the input and for the previous prepare's samples: about 3 ms a
        call on an H200 (benchmarks/DESIGN-RECORD.md), more than a small layer's whole
        preparation, and it serialises a model's layers; there copies are caught by the
        marker leaf of prepare's trees. With False the outputs are not fingerprinted
        either (arrays prepared then are not caught as copies later).
    auto_picks_triton : bool
        Whether ``backend="auto"`` may pick the Triton kernels on CUDA (when torch and
        triton import); ``auto_takes_triton`` then says whether they win for the layer.
    host_layout : bool or None
        Where ``load`` and ``convert`` put a layer into the kernel's layout: None (default)
        by the rule of ``checkpoint.load.layout_on_host`` (on the host when the layer stays
        there or goes to CPU devices, else ``prepare_layer`` on its devices), True or False
        always or never on the host (``bench-io --layout`` measures both).
    one_array_min_bytes : int
        Padded layers (per device) from which ``donate=True`` prepares one array after
        another, each input deleted once its result is dispatched: the transient is then
        about the largest array rather than the whole layer (a padded layer cannot move in
        place: every shape grows). Below it, one program (three dispatches fewer).
    auto_picks_flashinfer : bool
        Whether "auto" may pick flashinfer. Measured on an H100 and an H200
        (benchmarks/DESIGN-RECORD.md): XLA's fused rows + swizzle transpose is faster than the
        row permutation followed by flashinfer's kernel (which moves one byte per thread),
        so "auto" stays on XLA. Set from measurements, not from availability.
    """

    layer_share: int = 32
    min_chunk_bytes: int = 64 << 20
    free_share: int = 8
    unroll: bool = False
    fuse_scales: bool = True
    pallas: bool = True
    triton_min_bytes: int = 16 << 20
    triton_route: str = dataclasses.field(
        default_factory=lambda: os.environ.get("JAX_NVFP4_TRITON_ROUTE", "auto"))
    check_copies: bool | None = None
    auto_picks_triton: bool = True
    auto_picks_flashinfer: bool = False
    host_layout: bool | None = None
    one_array_min_bytes: int = 64 << 20


_DEFAULTS = Options()  # JAX_NVFP4_TRITON_ROUTE read here, once, at import
_CURRENT: contextvars.ContextVar[Options] = contextvars.ContextVar("jax_nvfp4_options",
                                                                   default=_DEFAULTS)


def current() -> Options:
    """The options in force here (the defaults unless inside :func:`override`)."""
    return _CURRENT.get()


def check_route(route: str) -> str:
    """``route`` if it is one of ``TRITON_ROUTES``, else a ValueError naming it."""
    if route not in TRITON_ROUTES:
        raise ValueError(f"triton_route (JAX_NVFP4_TRITON_ROUTE) must be \"auto\", \"xla\" or "
                         f"\"callback\", got {route!r}")
    return route


@contextlib.contextmanager
def override(**changes):
    """The current options with ``changes`` (field names of :class:`Options`) in force
    inside the ``with`` block; restored on exit, also on an exception.

    Raises
    ------
    TypeError
        An unknown option name.
    ValueError
        An unknown ``triton_route``.
    """
    if "triton_route" in changes:
        check_route(changes["triton_route"])
    with using(dataclasses.replace(current(), **changes)) as options:
        yield options


@contextlib.contextmanager
def using(options: Options):
    """``options`` (an :class:`Options`, e.g. made once by ``dataclasses.replace``) in force
    inside the ``with`` block; restored on exit. Calls under one object reuse their plans
    without comparing options field by field (``override`` makes a new object each time)."""
    if not isinstance(options, Options):
        raise TypeError(f"using() takes an Options, got {type(options).__name__}")
    token = _CURRENT.set(options)
    try:
        yield options
    finally:
        _CURRENT.reset(token)
