"""Layers sharded over a device mesh: every device prepares its own shard, in place.

The layout is per expert, so a layer whose expert axis (axis 0) is split over a
mesh needs no communication: ``shard_map`` runs the same per-layer program
(:func:`jax_nvfp4.transform.layer_program`, built for the *local* sizes) on each
device's block, and ``jit`` donation keeps it in that device's buffer. Outputs
get the inputs' shardings. Only addressable shards are touched, so the same
call works in every process of a multi-host ``jax.distributed`` job.

Intermediate-axis (tensor-parallel) sharding is supported the way TP MoE
kernels see it: each device's slice of ``I`` (rows of w13, columns of w2) is
its own layer with the local ``I``, i.e. a device's w13 rows are its own
``[up; gate]``. The hidden axis cannot be split (the row shuffle of w2 and the
128x4 scale tiles of w13 span all of ``H``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ..layout.spec import DEFAULT_HIDDEN_ALIGNMENT, NAMES, LayerSpec, check_arrays

# Per array, which axis holds I and which holds H ((w13 rows, H/2 cols), (w2 H rows, I cols)).
_I_AXIS = (1, 1, 2, 2)
_H_AXIS = (2, 2, 1, 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a sharded layer runs: the mesh, the four input shardings, and the per-device spec."""

    shardings: tuple[NamedSharding, ...]
    local: LayerSpec

    @property
    def mesh(self):
        return self.shardings[0].mesh


def _axes(spec: PartitionSpec, rank: int) -> tuple[tuple[str, ...], ...]:
    """Mesh axes splitting each array axis: ``P("x", None)`` -> ``(("x",), (), ())``."""
    out = []
    for k in range(rank):
        entry = spec[k] if k < len(spec) else None
        if entry is None:
            out.append(())
        elif isinstance(entry, (tuple, list)):
            out.append(tuple(entry))
        else:
            out.append((entry,))
    return tuple(out)


def _describe(axes: tuple[str, ...]) -> str:
    return "unsplit" if not axes else f"split over mesh axes {axes}"


def plan(arrays, *, gated: bool, prepared: bool, where: str = "",
         hidden_alignment: int = DEFAULT_HIDDEN_ALIGNMENT) -> Plan | None:
    """The sharded plan of a validated layer, or ``None`` for the one-device path.

    ``arrays`` have already passed :func:`check_arrays` (global shapes). Raises
    ``ValueError`` (naming the array, the rule, expected vs got) for shardings
    that cannot be prepared shard by shard; nothing is donated before this runs.
    """
    shardings = [getattr(x, "sharding", None) for x in arrays]
    named = [isinstance(s, NamedSharding) for s in shardings]
    if not any(named):
        for name, s in zip(NAMES, shardings):
            if s is not None and len(s.device_set) > 1:
                raise ValueError(
                    f"{where}{name}: sharded with {type(s).__name__} over {len(s.device_set)} "
                    "devices; only NamedSharding(mesh, PartitionSpec(...)) is supported "
                    "(shard the expert axis, axis 0)"
                )
        devices = [s.device_set if s is not None else None for s in shardings]
        for name, d in zip(NAMES[1:], devices[1:]):
            if d is not None and devices[0] is not None and d != devices[0]:
                raise ValueError(
                    f"{where}{name} is on {sorted(map(str, d))}, but {where}{NAMES[0]} is on "
                    f"{sorted(map(str, devices[0]))}; the four arrays must live on the same "
                    "device (or be sharded on one mesh)"
                )
        return None
    mesh = shardings[named.index(True)].mesh
    first = NAMES[named.index(True)]
    for name, s, is_named in zip(NAMES, shardings, named):
        if not is_named or s.mesh != mesh:
            got = type(s).__name__ if not is_named else f"mesh {s.mesh}"
            raise ValueError(
                f"{where}{name}: expected a NamedSharding on the mesh of {where}{first} "
                f"({mesh}), got {got}; all four arrays must be sharded on one mesh"
            )
    axes = [_axes(s.spec, 3) for s in shardings]
    e_axes, i_axes = axes[0][0], axes[0][1]
    for name, a, ia, ha in zip(NAMES, axes, _I_AXIS, _H_AXIS):
        if a[0] != e_axes:
            raise ValueError(
                f"{where}{name}: expert axis 0 is {_describe(a[0])}, but {where}{NAMES[0]}'s is "
                f"{_describe(e_axes)}; all four arrays must split their experts the same way"
            )
        if a[ha]:
            raise ValueError(
                f"{where}{name}: the hidden axis (axis {ha}) is {_describe(a[ha])}; it must be "
                "unsplit (the row shuffle and the 128x4 scale tiles span all of H). Shard the "
                "expert axis (axis 0) instead"
            )
        if a[ia] != i_axes:
            raise ValueError(
                f"{where}{name}: the intermediate axis (axis {ia}) is {_describe(a[ia])}, but "
                f"{where}{NAMES[0]}'s rows are {_describe(i_axes)}; w13 rows and w2 columns "
                "must split I over the same mesh axes"
            )
    for name, x, a in zip(NAMES, arrays, axes):
        for k, (size, split) in enumerate(zip(x.shape, a)):
            n = math.prod(mesh.shape[m] for m in split)
            if size % n:
                what = "experts" if k == 0 else "entries"
                raise ValueError(
                    f"{where}{name}: axis {k} has {size} {what}, which cannot be split evenly "
                    f"over {n} shards (mesh axes {split}); it must be divisible by {n}"
                )
    local_shapes = [s.shard_shape(tuple(x.shape)) for s, x in zip(shardings, arrays)]
    local_arrays = [jax.ShapeDtypeStruct(shape, x.dtype) for shape, x in zip(local_shapes, arrays)]
    try:
        local = check_arrays(local_arrays, gated=gated, prepared=prepared, where=where,
                             hidden_alignment=hidden_alignment)
    except ValueError as err:
        raise ValueError(
            f"each device's shard is prepared as its own layer (I {_describe(i_axes)}, "
            f"local shapes {[list(s) for s in local_shapes]}), and it is not valid: {err}"
        ) from None
    return Plan(shardings=tuple(shardings), local=local)


def shard_map(f, mesh, in_specs, out_specs):
    # No replication checks: the program is per device by construction, and
    # Pallas calls inside it declare no varying mesh axes.
    if hasattr(jax, "shard_map"):  # jax >= 0.7
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map
    return shard_map(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def jit(program, plan: Plan, *, donate: bool):
    """``program`` (a function of the four local arrays) jitted over the plan's mesh.

    Each device runs ``program`` on its own shard; the outputs keep the inputs'
    shardings, so donated buffers are reused in place on every device.
    """
    specs = tuple(s.spec for s in plan.shardings)
    mapped = shard_map(program, plan.mesh, in_specs=specs, out_specs=specs)
    return jax.jit(mapped, out_shardings=plan.shardings,
                   donate_argnums=(0, 1, 2, 3) if donate else ())


def array_map(fn, plan: Plan, k: int):
    """``fn`` (of the ``k``-th local array alone) mapped over the plan's mesh: each
    device runs it on its own shard of array ``k``; the result keeps that sharding."""
    spec = plan.shardings[k].spec
    return shard_map(fn, plan.mesh, in_specs=(spec,), out_specs=spec)
