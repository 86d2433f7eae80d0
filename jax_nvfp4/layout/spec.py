"""Shapes of one NVFP4 MoE layer, and validation of its four arrays.

Everything a transform needs is checked here, before any buffer is donated,
so a bad call raises and leaves the caller's arrays alive.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")
BLOCK = 16  # FP4 values per float8_e4m3fn scale (NVFP4)
SCALE_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
_UINT8 = np.dtype(np.uint8)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# The kernel tiles H by 128 (w2's 128-row scale tiles; w13's scale columns H/16 by 4);
# flashinfer documents H % 256 for NVFP4 ("128 gives wrong results"), hence the default.
HIDDEN_TILE = 128
DEFAULT_HIDDEN_ALIGNMENT = 256


def check_hidden_alignment(value) -> int:
    """``hidden_alignment`` validated: a positive multiple of 128 (``TypeError``/``ValueError``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"hidden_alignment must be an int (a positive multiple of {HIDDEN_TILE}),"
                        f" got {value!r}")
    if value <= 0 or value % HIDDEN_TILE:
        raise ValueError(f"hidden_alignment must be a positive multiple of {HIDDEN_TILE} (the "
                         f"kernel tiles H by {HIDDEN_TILE}; flashinfer wants 256 for NVFP4), "
                         f"got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Sizes of one MoE layer: ``hidden`` and ``intermediate`` as stored (the model's
    sizes); ``padded_h`` and ``padded_i`` as the kernel needs them.

    ``hidden_alignment``: ``H`` is padded to a multiple of it (a positive multiple of 128).
    """

    experts: int
    hidden: int
    intermediate: int
    gated: bool
    hidden_alignment: int = DEFAULT_HIDDEN_ALIGNMENT

    @property
    def padded_h(self) -> int:
        # As vLLM's align_fp4_moe_weights_for_fi: zero columns of w13 (and its
        # scales), zero rows of w2 (and its scales), up to the alignment.
        return _round_up(self.hidden, self.hidden_alignment)

    @property
    def padded_i(self) -> int:
        # Scale rows of w13 must tile by 128 (gated: 2I % 128) and w2 scale
        # columns I/16 by 4, hence 64 (gated) or 128 (non-gated); as vLLM.
        return _round_up(self.intermediate, 64 if self.gated else 128)

    @property
    def needs_padding(self) -> bool:
        return self.padded_i != self.intermediate or self.padded_h != self.hidden

    def shapes(self, *, padded: bool) -> tuple[tuple[int, int, int], ...]:
        """Shapes of ``(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale)``;
        ``padded``: with ``padded_h`` and ``padded_i``."""
        e = self.experts
        h = self.padded_h if padded else self.hidden
        i = self.padded_i if padded else self.intermediate
        r1 = 2 * i if self.gated else i
        return (e, r1, h // 2), (e, r1, h // BLOCK), (e, h, i // 2), (e, h, i // BLOCK)

    @property
    def nbytes(self) -> int:
        """Bytes of the four (unpadded) arrays."""
        return sum(math.prod(s) for s in self.shapes(padded=False))


def _dtype_name(dt) -> str:
    return np.dtype(dt).name


def deleted_error(label: str) -> ValueError:
    """The refusal of an input that was donated before (``label``: the array's name)."""
    return ValueError(
        f"{label} has been deleted: it was donated to an earlier call "
        "(prepare/prepare_layer consume their inputs by default). Use the arrays "
        "that call returned, or pass donate=False to keep the inputs."
    )


def check_arrays(arrays, *, gated: bool, prepared: bool = False, where: str = "",
                 hidden_alignment: int = DEFAULT_HIDDEN_ALIGNMENT) -> LayerSpec:
    """Validate the four arrays of one layer and return its :class:`LayerSpec`.

    ``arrays`` are ``(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale)``.
    Unprepared (``prepared=False``): ``H`` a multiple of 16 (padded to ``hidden_alignment``
    by prepare), ``I`` of 16. With ``prepared=True`` they must already be in the (padded)
    TRT-LLM shapes: ``H`` a multiple of 128, ``I`` of 64 (gated) or 128; the spec returned
    then needs no padding (``hidden_alignment`` is ignored).
    ``where`` prefixes array names in messages (e.g. a pytree path).
    Raises ``TypeError`` for wrong types/dtypes and ``ValueError`` for the rest.
    """
    hidden_alignment = check_hidden_alignment(hidden_alignment)
    if len(arrays) != 4:
        raise TypeError(f"expected the 4 arrays {NAMES}, got {len(arrays)}")
    label = {n: f"{where}{n}" for n in NAMES}
    for name, x in zip(NAMES, arrays):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{label[name]}: expected an array, got {type(x).__name__}")
        if hasattr(x, "__jax_array__") and not isinstance(x, jax.Array):
            # e.g. flax nnx.Param: jit would rebuild the wrapper around tracers.
            raise TypeError(
                f"{label[name]}: expected a jax or numpy array, got a {type(x).__name__} "
                "wrapper; pass its array (e.g. param.get_value()) or call prepare() on the "
                "tree, which unwraps and rewraps such leaves")
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted():
            raise deleted_error(label[name])
        if len(x.shape) != 3:
            raise ValueError(
                f"{label[name]}: expected rank 3 [experts, rows, cols], got shape {tuple(x.shape)}"
            )
    w13, s13, w2, s2 = arrays
    for name, x in (("w13_weight", w13), ("w2_weight", w2)):
        if np.dtype(x.dtype) != _UINT8:
            raise TypeError(
                f"{label[name]}: expected uint8 (two packed e2m1 values a byte), "
                f"got {_dtype_name(x.dtype)}"
            )
    for name, x in (("w13_weight_scale", s13), ("w2_weight_scale", s2)):
        if np.dtype(x.dtype) not in (SCALE_DTYPE, _UINT8):
            raise TypeError(
                f"{label[name]}: expected float8_e4m3fn (or its uint8 bytes), "
                f"got {_dtype_name(x.dtype)}"
            )
    for name, x in zip(NAMES, arrays):
        if 0 in tuple(x.shape):
            raise ValueError(
                f"{label[name]}: empty array (shape {tuple(x.shape)}); a layer needs at least "
                "one expert and non-zero H and I"
            )
    e = w13.shape[0]
    for name, x in zip(NAMES[1:], arrays[1:]):
        if x.shape[0] != e:
            raise ValueError(
                f"{label[name]}: expected {e} experts (axis 0 of {label['w13_weight']}), "
                f"got {x.shape[0]} (shape {tuple(x.shape)})"
            )
    r1, h = w13.shape[1], 2 * w13.shape[2]
    if w2.shape[1] != h:
        raise ValueError(
            f"{label['w2_weight']}: expected hidden size {h} rows (2 x {label['w13_weight']}"
            f".shape[2]), got {w2.shape[1]} (shape {tuple(w2.shape)})"
        )
    if prepared and h % HIDDEN_TILE:
        raise ValueError(
            f"{label['w13_weight']}: hidden size H = 2 x shape[2] = {h} is not a prepared size "
            f"(a multiple of {HIDDEN_TILE}); these arrays are not in the TRT-LLM layout"
        )
    if h % BLOCK:
        raise ValueError(
            f"{label['w13_weight']}: hidden size H = 2 x shape[2] = {h} must be a multiple of "
            f"{BLOCK} (one scale per {BLOCK} values; prepare pads it to a multiple of "
            "hidden_alignment)"
        )
    i = 2 * w2.shape[2]
    if i % BLOCK:
        raise ValueError(
            f"{label['w2_weight']}: intermediate size I = 2 x shape[2] = {i} must be a multiple "
            f"of {BLOCK} (one scale per {BLOCK} values)"
        )
    want_r1 = 2 * i if gated else i
    if r1 != want_r1:
        what = f"2 x I = {want_r1} rows ([up; gate])" if gated else f"I = {want_r1} rows"
        raise ValueError(
            f"{label['w13_weight']}: with gated={gated} expected {what}, got {r1} "
            f"(shape {tuple(w13.shape)}); pass gated={not gated} if the layer is "
            f"{'not ' if gated else ''}gated"
        )
    spec = LayerSpec(experts=e, hidden=h, intermediate=i, gated=gated,
                     hidden_alignment=HIDDEN_TILE if prepared else hidden_alignment)
    for name, x, want in zip(NAMES, arrays, spec.shapes(padded=False)):
        if tuple(x.shape) != want:
            raise ValueError(
                f"{label[name]}: expected shape {list(want)} for E={e}, H={h}, I={i}, "
                f"gated={gated}, got {list(x.shape)}"
            )
    if prepared and spec.needs_padding:
        raise ValueError(
            f"{label['w2_weight']}: I = {i} is not a prepared size (a multiple of "
            f"{64 if gated else 128}); these arrays are not in the TRT-LLM layout"
        )
    return spec
