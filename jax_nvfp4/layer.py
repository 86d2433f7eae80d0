"""prepare_layer / unprepare_layer: one MoE layer to and from the TRT-LLM layout (the
public functions; the program they run is ``transform``'s)."""

from __future__ import annotations

from .layout.spec import DEFAULT_HIDDEN_ALIGNMENT
from .transform import plan_job, run_job
from .tree import fuse as _fuse


def _run(arrays, w13_order="up_gate", **call):
    # w13_order: the halves swapped around the layout (fuse.run_ordered)
    _fuse.check_order(w13_order, call["gated"])
    return _fuse.run_ordered(plan_job(arrays, **call), w13_order, run_job)


def prepare_layer(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, *,
                  gated: bool = True, donate: bool = True, backend: str = "auto",
                  chunk_bytes: int | None = None,
                  hidden_alignment: int = DEFAULT_HIDDEN_ALIGNMENT, w13_order: str = "up_gate"):
    """Convert one NVFP4 MoE layer to the TRT-LLM (flashinfer ``trtllm_fp4_block_scale_moe``) layout.

    Byte for byte what vLLM 0.33 produces: ``H`` and ``I`` zero-padded as its
    ``align_fp4_moe_hidden_dim_for_fi`` and ``align_fp4_moe_weights_for_fi``, then
    flashinfer's helpers (``_maybe_get_cached_w3_w1_permute_indices``,
    ``get_w2_permute_indices_with_cache``, ``block_scale_interleave``).

    Parameters
    ----------
    w13_weight : uint8 ``[E, R1, H/2]``
        Packed e2m1 (low nibble first) of the fused up/gate projection. Rows are
        ``[up (w3); gate (w1)]`` with ``R1 = 2I`` when ``gated``, else ``R1 = I``.
        ``E >= 1``; ``H`` and ``I`` positive multiples of 16 (one scale per 16 values;
        both are padded to what the kernel needs).
    w13_weight_scale : float8_e4m3fn or uint8 ``[E, R1, H/16]``
        Linear (row-major) block scales, one per 16 values, same rows as ``w13_weight``.
    w2_weight : uint8 ``[E, H, I/2]``
        Packed e2m1 of the down projection.
    w2_weight_scale : float8_e4m3fn or uint8 ``[E, H, I/16]``
        Linear block scales of ``w2_weight``. uint8 scale bytes cost one extra copy of
        the scales on the way to float8.
    gated : bool, keyword-only
        Whether w13 holds ``[up; gate]`` for a gated activation (interleaved for the kernel).
    donate : bool, keyword-only
        Consume the inputs and work in place in their buffers (extra device memory:
        one chunk). With ``False`` the inputs stay valid and the outputs are new buffers.
    backend : {"auto", "xla", "triton", "flashinfer"}, keyword-only
        ``"xla"`` is pure JAX and runs on every platform. ``"triton"`` moves every array
        with Triton kernels inside the jitted program (CUDA only; needs a CUDA build of
        torch, which brings triton; same bytes; fastest on large layers).
        ``"flashinfer"`` runs the scale swizzle with flashinfer's
        ``block_scale_interleave`` kernel (CUDA only; needs torch and flashinfer; same
        bytes). ``"auto"`` picks ``"triton"`` on CUDA, when installed, where XLA would move
        an array of 2 GiB or more (per device) a byte per thread, and for layers of
        16 MiB or more (per device) that are padded or donated, else ``"xla"``; never
        flashinfer (measured slower). The rule and its measurements:
        ``jax_nvfp4.backends.select.auto_takes_triton``.
    chunk_bytes : int, optional, keyword-only
        Scratch budget of the in-place loop (with ``"triton"``: gated w13's scales, and
        w13 with them where it cannot move in one pass; default: 1/32 of the layer, at least
        64 MiB, at most 1/8 of the device's free memory): larger may be faster,
        smaller needs less free memory. Ignored with ``donate=False``.
    hidden_alignment : int, keyword-only
        ``H`` is padded with zeros to ``Hp``, a multiple of this (a positive multiple of
        128; default 256, which flashinfer requires for NVFP4: "128 gives wrong
        results"), as vLLM's ``align_fp4_moe_weights_for_fi``. 128 pads only what the
        layout itself needs.
    w13_order : {"up_gate", "gate_up"}, keyword-only
        The order of each expert's two halves of ``w13_weight`` and its scales (gated):
        ``"up_gate"`` = ``[up (w3); gate (w1)]`` (default; what :func:`load` produces),
        ``"gate_up"`` = ``[gate (w1); up (w3)]`` (Hugging Face, vLLM, tpu-inference). The
        output is the kernel's layout either way. ``"gate_up"`` swaps the halves first, in
        place in the donated buffers (one chunk of scratch; one more pass over w13 and its
        scales); with ``donate=False`` into a temporary copy of w13 and its scales. Sharded:
        per device (with ``I`` split, each device's rows are its own ``[gate; up]``). With
        donation the swap consumes the inputs before the layout runs.

    Returns
    -------
    tuple of jax.Array
        ``(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale)`` with the padded
        shapes ``[E, R1p, Hp/2]``, ``[E, R1p, Hp/16]``, ``[E, Hp, Ip/2]``, ``[E, Hp, Ip/16]``:
        ``Hp`` is ``H`` rounded up to ``hidden_alignment`` (zero columns of w13 and its
        scales, zero rows of w2 and its scales) and ``Ip`` is ``I`` rounded up to a
        multiple of 64 (gated) or 128 (not gated): each half of w13 gets zero rows, w2 zero
        columns (``R1p = 2 Ip`` gated, ``Ip`` not). Padding is applied before the layout,
        so it is permuted with the rest. Without padding the shapes are the inputs'.
        Weights are uint8 with rows permuted; scales are float8_e4m3fn with the nominal
        shape ``[E, rows, K/16]`` and their bytes, flat per expert, in the 128x4 swizzled
        order of the kernel. A padded layer is prepared out of place (new buffers of the
        padded size; donated inputs are deleted).

    Raises
    ------
    TypeError
        A wrong dtype or a non-array argument.
    ValueError
        Inconsistent or empty shapes (``E``, ``H`` or ``I`` zero), ``H % 16 != 0``,
        ``I % 16 != 0``, a ``hidden_alignment`` that is not a positive multiple of 128, an
        unknown backend, ``"flashinfer"`` on non-CUDA arrays, or arrays already prepared or
        deleted (also copies of prepared arrays, where detected: see Notes).
        Nothing is donated when this is raised.
    TypeError
        Called under ``jax.jit``/``vmap``/``grad`` (tracers): call it outside the traced
        function; ``dequantize_layer`` is the jittable reader of prepared arrays.
    ImportError
        ``backend="flashinfer"`` without torch/flashinfer (says what to install);
        nothing is donated.

    Notes
    -----
    Arrays sharded with ``NamedSharding(mesh, P(<axes>))`` along the expert axis are
    prepared where they lie: each device transforms its own experts (in place when
    donated, ``chunk_bytes`` per device), with no communication, and the outputs keep
    the inputs' shardings. If ``I`` is split too (w13 rows and w2 columns over the same
    mesh axes), each device's slice is prepared as its own layer with the local ``I``:
    its w13 rows must be its own ``[up; gate]``. The hidden axis cannot be split.
    Multi-host: each process makes the same call and touches only its own shards.

    Arrays that came out of ``prepare`` are refused (they are marked). So are copies of
    them (``jnp.array(out)``, ``np.asarray(out)``, ``jax.device_put`` elsewhere, also after
    the original is gone), recognised by 64 sampled bytes per array: checking costs
    nothing for inputs whose shape no prepared array had (raw layers of a padded model),
    else one 64-byte gather per array and a wait for the inputs (about 0.1 ms). Not
    recognised: copies whose sampled bytes are all equal (e.g. zeros, the same in either
    layout), or sharded differently from the original, or modified since. By default
    only arrays on the CPU (and numpy arrays) are fingerprinted and checked: on a GPU
    the wait costs about 3 ms a call (H200), so there a copy is caught only through the
    ``nvfp4_layout`` marker leaf that :func:`prepare` puts into its trees.
    ``with jax_nvfp4.options.override(check_copies=True)`` checks on every platform,
    ``False`` nowhere.
    """
    return _run((w13_weight, w13_weight_scale, w2_weight, w2_weight_scale), gated=gated,
                donate=donate, backend=backend, chunk_bytes=chunk_bytes, inverse=False,
                hidden_alignment=hidden_alignment, w13_order=w13_order)


def unprepare_layer(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, *,
                    gated: bool = True, donate: bool = True, backend: str = "auto",
                    chunk_bytes: int | None = None, hidden_size: int | None = None,
                    intermediate_size: int | None = None, w13_order: str = "up_gate"):
    """Exact inverse of :func:`prepare_layer`: the checkpoint layout back, bytes unchanged.

    Takes the arrays ``prepare_layer`` returned (padded shapes ``Hp``, ``Ip``, as listed
    there: ``Hp`` a multiple of 128, ``Ip`` of 64 gated or 128 not gated) and returns them
    in the linear layout, scales as float8_e4m3fn. Options as in :func:`prepare_layer`,
    except that every backend name is accepted but the inverse always runs on XLA
    (flashinfer has no inverse kernel).

    Parameters
    ----------
    hidden_size, intermediate_size : int, optional, keyword-only
        The layer's valid ``H`` and ``I`` (a :class:`PreparedLayer`'s ``.hidden_size`` and
        ``.intermediate_size``): the padding is cropped back, so that
        ``unprepare_layer(*prepare_layer(*x), hidden_size=H, intermediate_size=I)`` gives
        ``x`` exactly (the last ``Hp - H`` columns of w13 and its scales and rows of w2 and
        its scales are dropped; the last ``Ip - I`` rows of each half of w13 and columns of
        w2). Each a positive multiple of 16, at most the prepared size; ``I`` must pad to
        the prepared ``Ip`` (per device when ``I`` is split over devices: the global
        ``I``). None (default): that padding is kept. A crop runs out of place (new
        buffers; donated inputs are deleted).
    w13_order : {"up_gate", "gate_up"}, keyword-only
        The order of w13's halves in the result (``"gate_up"``: swapped back after the
        layout is undone, in place).
    """
    return _run((w13_weight, w13_weight_scale, w2_weight, w2_weight_scale), gated=gated,
                donate=donate, backend=backend, chunk_bytes=chunk_bytes, inverse=True,
                hidden_size=hidden_size, intermediate_size=intermediate_size,
                w13_order=w13_order)
