"""Which backend runs a layer: the name checked, ``"auto"``'s rule, and whether the weights'
rows go through the Pallas kernels. The one place that decides (``choose``).

* ``"xla"`` (``xla``): reshapes and transposes (Pallas row kernels for the weights on CUDA).
* ``"triton"`` (``triton``): every array moved by Triton kernels (CUDA).
* ``"flashinfer"`` (``flashinfer``): rows in XLA, the 128x4 scale swizzle by flashinfer's
  ``block_scale_interleave``.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from ..layout.spec import LayerSpec
from ..options import Options, current
from . import flashinfer, pallas
from .triton import program as triton

BACKENDS = ("auto", "xla", "triton", "flashinfer")


def _devices(arrays):
    out = set()
    for x in arrays:
        if isinstance(x, jax.Array) and not x.is_deleted():
            out |= set(x.devices())
    return out


def is_cuda(device) -> bool:
    """Whether ``device`` is a CUDA GPU (not ROCm)."""
    return device.platform == "gpu" and "rocm" not in str(
        getattr(device.client, "platform_version", "")).lower()


def _on_cuda(arrays) -> bool:
    if not all(isinstance(x, jax.Array) for x in arrays):
        return False
    devices = _devices(arrays)
    return bool(devices) and all(is_cuda(d) for d in devices)


def _where(arrays) -> str:
    return ", ".join(sorted({d.platform for d in _devices(arrays)}) or ["not jax arrays"])


def _on_cpu(arrays) -> bool:
    devices = _devices(arrays)
    return bool(devices) and all(d.platform == "cpu" for d in devices)


def use_pallas(arrays, options: Options | None = None) -> bool:
    """Whether the weights' rows move with the Pallas kernels: on CUDA GPUs, when enabled."""
    options = options or current()
    return options.pallas and all(isinstance(x, jax.Array) and
                                  all(d.platform == "gpu" for d in x.devices()) for x in arrays)


def needs_triton(spec: LayerSpec) -> bool:
    """Whether an array of the layer is 2 GiB or more: too large for the Pallas row
    kernels, which leaves XLA moving it a byte per thread."""
    return not all(pallas.fits(math.prod(s)) for s in spec.shapes(padded=True))


def auto_takes_triton(spec: LayerSpec, *, donate: bool, inverse: bool = False,
                      pallas: bool = True, options: Options | None = None) -> bool:
    """The rule of ``backend="auto"`` on CUDA: whether the Triton kernels prepare this
    (per-device) layer rather than XLA (with the Pallas row kernels where ``pallas``).
    ``resolve_backend`` then checks that Triton can run (CUDA arrays, torch and triton
    installed). Each branch names its measurement: one H200, one run,
    benchmarks/results/h200-2026-12-03-38785e3.json (device ms; the Triton kernels launched
    through XLA, the buffer_callback route in brackets where it decides)."""
    options = options or current()
    if inverse:  # no kernel for the inverse
        return False
    if not pallas:  # XLA alone moves uint8 a byte per thread: a third of the copy bandwidth
        return True
    if needs_triton(spec):  # an array of 2 GiB or more stays off Pallas (int32 offsets):
        return True  # DeepSeek-V3 donated triton 5.38 vs xla 8.93, not 3.07 vs 5.70
    if spec.nbytes < options.triton_min_bytes:  # the launch costs more than the kernels save:
        return False  # tiny (0.4 MB) donated xla 0.052 vs triton 0.071 [0.162]
    if spec.needs_padding or donate:  # out of place with padding, or in place:
        # Qwen3-30B TP8 (40 MB, padded) triton 0.071 [0.105] vs xla 0.131 donated, 0.079 vs
        # 0.128 not; Nemotron-3-Nano (padded) 0.403 vs 1.685; donated Qwen3-30B-A3B 0.305
        # vs 0.375, DeepSeek-V3 TP8 0.490 vs 0.843, EP8 0.746 vs 0.822 (w13 through scratch;
        # by cycles since, h200-2026-12-04-049874a.json: 0.497 vs 0.829).
        return True
    # Not donated, not padded: equal on the device (Qwen3-30B-A3B 0.200 both, DeepSeek-V3
    # TP8 0.413 vs 0.442, EP8 0.409 vs 0.418); XLA's wall is lower where it differs
    # (Qwen3-30B-A3B 0.46 vs 0.65 ms [0.80], EP8 0.69 vs 0.75 ms).
    return False


def resolve_backend(backend: str, arrays, *, inverse: bool = False,
                    auto_triton: bool = True, options: Options | None = None) -> str:
    """The backend that will run (``"xla"``, ``"triton"`` or ``"flashinfer"``).

    Checks the name, and for ``"triton"`` / ``"flashinfer"`` that their packages
    import and the arrays live on a CUDA device (Triton: or on CPU under
    ``TRITON_INTERPRET=1``), before anything is donated. The inverse has no
    kernel: ``unprepare`` always runs on XLA. ``auto_triton``: whether ``"auto"``
    takes Triton for this layer where it can run (``auto_takes_triton``).

    Raises
    ------
    ValueError
        An unknown backend, or a kernel backend for arrays not on a CUDA device.
    ImportError
        A kernel backend without its packages installed (says what to install).
    """
    options = options or current()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if inverse or backend == "xla":
        return "xla"
    if backend == "auto":
        if (options.auto_picks_triton and auto_triton and _on_cuda(arrays)
                and triton.missing() is None):
            return "triton"
        if options.auto_picks_flashinfer and _on_cuda(arrays) and flashinfer.missing() is None:
            return "flashinfer"
        return "xla"
    if backend == "triton":
        missing = triton.missing()
        if missing:
            raise ImportError(f'backend="triton": {missing}; or use backend="xla"')
        if not (_on_cuda(arrays) or (_on_cpu(arrays) and triton.interpreting())):
            raise ValueError(
                f'backend="triton" needs the arrays on a CUDA GPU; they are on {_where(arrays)}. '
                'Use backend="xla" (any platform) or jax.device_put them to a CUDA device first'
            )
        return "triton"
    missing = flashinfer.missing()
    if missing:
        raise ImportError(f'backend="flashinfer": {missing}; or use backend="xla"')
    if not _on_cuda(arrays):
        raise ValueError(
            'backend="flashinfer" needs the arrays on a CUDA GPU (flashinfer\'s kernel is '
            f"CUDA only); they are on {_where(arrays)}. Use backend=\"xla\" (any platform) "
            "or jax.device_put them to a CUDA device first"
        )
    for d in _devices(arrays):
        flashinfer.warm_up(d)
    return "flashinfer"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What runs one (per-device) layer: the resolved ``backend``, whether the weights'
    rows use the Pallas kernels, and for Triton how its kernels are launched (``via``)."""

    backend: str
    pallas: bool
    via: str | None = None


def choose(backend: str, arrays, spec: LayerSpec, *, donate: bool, inverse: bool,
           options: Options) -> Choice:
    """The decision for one layer's call (``spec``: per device): :func:`use_pallas`, then
    ``auto``'s rule (:func:`auto_takes_triton`; without Pallas, XLA moves the weights a
    byte per thread and Triton wins everywhere), then :func:`resolve_backend`'s checks
    (``"flashinfer"`` may compile its module, ~40 s, on first use)."""
    on_pallas = use_pallas(arrays, options)
    resolved = resolve_backend(
        backend, arrays, inverse=inverse, options=options,
        auto_triton=auto_takes_triton(spec, donate=donate, inverse=inverse, pallas=on_pallas,
                                      options=options))
    via = triton.route(options) if resolved == "triton" and not inverse else None
    return Choice(resolved, on_pallas, via)
