"""backend="triton": the Triton kernels' bytes, in place and not, on CPU in Triton's interpreter.

The same kernels run compiled on CUDA (tests/test_gpu_triton.py); here they check the
index formulas, the chunking through scratch, aliasing and the refusals.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4 import options
from jax_nvfp4.backends import select as _backends
from jax_nvfp4 import transform as _prepare
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.backends.triton import program as _triton
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, assert_missing_extra_refused, random_layer, to_jax

pytestmark = pytest.mark.usefixtures("on_cpu")
NAMES = ("w13", "w13_scale", "w2", "w2_scale")
interpreted = pytest.mark.skipif(
    _triton.missing() is not None or not _triton.interpreting(),
    reason="needs triton, run in its interpreter (TRITON_INTERPRET=1, set by conftest on CPU)")


@interpreted
@pytest.mark.parametrize("e, h, i, gated, chunk_bytes", [
    (1, 128, 64, True, None),
    (5, 256, 128, True, 40000),      # 5 chunks of 1 expert through scratch
    (7, 128, 64, True, 40000),       # chunks of 4 and 3 experts
    (3, 128, 256, False, None),      # not gated: every array in one pass, in place
    (2, 256, 96, True, None),        # I padded to 128 (out of place)
    (2, 384, 80, False, None),       # not gated, I padded to 128
    (4, 128, 1024, True, 1 << 16),   # 2I = 2048 in one pass, rows wider than a block
    (3, 128, 192, True, 40000),      # 2I = 384 in one pass (512 lanes, 128 masked)
    (3, 256, 768, True, None),       # 2I = 1536 (Qwen3-30B-A3B) in one pass
    (2, 128, 384, True, 1 << 16),    # 2I = 768 (no short cycles): whole rows, 1024 lanes
    (2, 128, 1536, True, 1 << 16),   # 2I = 3072: w13 through scratch, 2 chunks
    (3, 128, 2048, True, 1 << 16),   # 2I = 4096: w13 by the cycles of its permutation
    (2, 192, 64, True, None),        # H padded to 256: every array read unpadded
    (3, 320, 128, False, None),      # not gated, H padded to 384
])
@pytest.mark.parametrize("donate", [True, False])
def test_triton_backend_is_bit_exact(rng, e, h, i, gated, chunk_bytes, donate):
    layer = random_layer(rng, e, h, i, gated=gated)
    arrays = to_jax(layer)
    pointers = [x.unsafe_buffer_pointer() for x in arrays]
    # hidden_alignment=128: the kernels on H as given (H padding: test_hidden_padding.py)
    out = jax_nvfp4.prepare_layer(*arrays, gated=gated, donate=donate, backend="triton",
                                  chunk_bytes=chunk_bytes, hidden_alignment=128)
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=gated,
                                                              hidden_alignment=128)):
        assert_bytes_equal(g, w, name)
    assert all(x.is_deleted() for x in arrays) == donate
    spec = LayerSpec(e, h, i, gated, hidden_alignment=128)
    if donate and not spec.needs_padding:
        assert [x.unsafe_buffer_pointer() for x in out] == pointers, "not in place"
    back = jax_nvfp4.unprepare_layer(*out, gated=gated, backend="triton", hidden_size=h,
                                     intermediate_size=i)
    for name, g, w in zip(NAMES, back, layer):
        assert_bytes_equal(g, w, f"round trip {name}")


@interpreted
@pytest.mark.parametrize("over_whole, pack", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("e, h, i", [(3, 256, 768), (2, 128, 1024), (3, 128, 2048)])
def test_w13_in_place_by_whole_rows_or_cycle_groups_gives_the_same_bytes(
        rng, monkeypatch, e, h, i, over_whole, pack):
    """Every way gated w13 can move in place (``tiles``' settings): 1536 rows (cycle groups
    of 256 or whole rows), 2048 (groups of 16 or whole rows), 4096 (groups of 16, one cycle
    a group or packed)."""
    from jax_nvfp4.backends.triton import tiles
    monkeypatch.setattr(tiles, "CYCLES_OVER_WHOLE", over_whole)
    monkeypatch.setattr(tiles, "PACK_CYCLES", pack)
    monkeypatch.setattr(_prepare, "_PLANS", {})
    _prepare._compiled.cache_clear()  # programs built under other settings
    try:
        spec = LayerSpec(e, h, i, True, hidden_alignment=128)
        assert tiles.w13_by_cycles(spec) == (over_whole or 2 * i > 2048)
        layer = random_layer(rng, e, h, i)
        arrays = to_jax(layer)
        pointers = [x.unsafe_buffer_pointer() for x in arrays]
        out = jax_nvfp4.prepare_layer(*arrays, backend="triton", hidden_alignment=128)
        for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, hidden_alignment=128)):
            assert_bytes_equal(g, w, name)
        assert [x.unsafe_buffer_pointer() for x in out] == pointers, "not in place"
    finally:
        _prepare._compiled.cache_clear()


@interpreted
@pytest.mark.parametrize("gated", [True, False])
def test_in_place_program_needs_one_chunk_of_scratch(gated):
    e, h, i = 8, 256, 128
    spec = LayerSpec(e, h, i, gated)
    one_pass = _triton.w13_in_one_pass(spec) or _triton.w13_by_cycles(spec)
    chunks = _prepare.experts_per_chunk(spec, 70000, w13_together=not one_pass)
    program = _prepare.compiled(spec, inverse=False, donate=True, chunks=chunks,
                                backend="triton", via=_triton.route())
    shapes = [jax.ShapeDtypeStruct(s, d) for s, d in
              zip(spec.shapes(padded=True), ("uint8", "float8_e4m3fn") * 2)]
    stats = program.lower(*shapes).compile().memory_analysis()
    assert stats.alias_size_in_bytes == spec.nbytes
    assert stats.temp_size_in_bytes <= _triton.scratch_bytes(spec, chunks) + 4096
    if gated:  # 2I = 256 rows: w13 in one pass, only its scales go through scratch
        assert one_pass and 0 < _triton.scratch_bytes(spec, chunks) <= 70000
        assert _triton.scratch_bytes(spec, chunks) % (256 * 256 // 16) == 0
    else:
        assert _triton.scratch_bytes(spec, chunks) == 0


def test_auto_takes_triton_when_donated_or_padded_xla_for_tiny_layers():
    deepseek, tp8, qwen3, tiny = (LayerSpec(*s, True) for s in (
        (256, 7168, 2048), (256, 7168, 256), (128, 2048, 768), (8, 256, 128)))
    ep8 = LayerSpec(32, 7168, 2048, True)          # w13 through scratch in place
    nemotron = LayerSpec(128, 2688, 1856, False)  # padded: H -> 2816, I -> 1920
    qwen3_tp8 = LayerSpec(128, 2048, 96, True)     # padded: I -> 128 (40 MB)
    tiny_padded = LayerSpec(8, 256, 96, True)
    for donate in (True, False):
        assert _backends.auto_takes_triton(deepseek, donate=donate)  # w13: 3.76 GB
        assert _backends.auto_takes_triton(nemotron, donate=donate)  # padded
        assert _backends.auto_takes_triton(qwen3_tp8, donate=donate)  # padded, 40 MB
        for spec in (qwen3, tp8, ep8):  # in place: triton; out of place: equal, XLA's wall
            assert _backends.auto_takes_triton(spec, donate=donate) == donate
        assert not _backends.auto_takes_triton(tiny, donate=donate)
        assert not _backends.auto_takes_triton(tiny_padded, donate=donate)
        assert _backends.auto_takes_triton(tiny, donate=donate, pallas=False)
        assert not _backends.auto_takes_triton(qwen3, donate=donate, inverse=True)
    with options.override(triton_min_bytes=0):
        assert _backends.auto_takes_triton(tiny, donate=True)
    with options.override(triton_min_bytes=1 << 40):
        assert not _backends.auto_takes_triton(qwen3, donate=True)
        assert _backends.auto_takes_triton(deepseek, donate=True)  # 2 GiB arrays: always


def test_w13_moves_in_one_pass_by_whole_rows_where_it_has_no_short_cycles():
    from jax_nvfp4.backends.triton import tiles
    assert tiles.whole_rows_fit(2048) and not tiles.whole_rows_fit(4096)
    assert _triton.w13_in_one_pass(LayerSpec(8, 256, 1024, True)) != tiles.CYCLES_OVER_WHOLE
    for spec in (LayerSpec(256, 7168, 256, True), LayerSpec(128, 2048, 768, True)):
        # DeepSeek-V3 TP8 (512 rows), Qwen3-30B-A3B (1536): short cycles
        assert _triton.w13_in_one_pass(spec) != tiles.CYCLES_OVER_WHOLE
        assert tiles.w13_by_cycles(spec) == tiles.CYCLES_OVER_WHOLE
    assert not _triton.w13_in_one_pass(LayerSpec(256, 7168, 2048, True))  # 4096: DeepSeek-V3
    assert not _triton.w13_in_one_pass(LayerSpec(8, 256, 128, False))   # not gated


def _apply_groups(table, x):
    moved = x.copy()
    for here, there in table:
        used = here >= 0
        assert (used == (there >= 0)).all() and (here[used.sum():] == -1).all()
        # whole cycles: the rows read are the rows written
        assert sorted(here[used]) == sorted(there[used])
        moved[here[used]] = x[there[used]]
    return moved


@pytest.mark.parametrize("rows", [256, 512, 1024, 1536, 4096, 8192, 16384])
def test_w13_cycle_groups_are_its_row_permutation(rows):
    from jax_nvfp4.backends.triton import tiles
    slots = tiles.cycle_slots(rows)
    assert slots == (tiles.CYCLE_SLOTS if rows & (rows - 1) == 0 else 256)
    x = np.arange(rows) * 7 + 3
    alone, packed = tiles._cycle_table(rows, False), tiles._cycle_table(rows, True)
    assert tiles.cycle_table(rows) is (packed if tiles.PACK_CYCLES else alone)
    for table in (alone, packed):  # one cycle a group, or packed
        assert table.dtype == np.int32 and table.shape[1:] == (2, slots)
        written = table[:, 0][table[:, 0] >= 0]
        assert len(np.unique(written)) == len(written)  # each row once
        np.testing.assert_array_equal(_apply_groups(table, x),
                                      x[_reference.w13_row_index(rows, gated=True)])
    if rows == 4096:  # 350 cycles of at most 12 rows, packed into fewer groups of 16
        assert len(alone) == 350 and len(packed) < 350


def test_w13_moves_by_cycles_or_through_scratch():
    from jax_nvfp4.backends.triton import tiles
    for rows in (3072, 7168):  # cycles of 1476 and 2388 rows: too long for a program
        assert tiles.cycle_table(rows) is None and tiles.cycle_slots(rows) is None
    deepseek, kimi = LayerSpec(256, 7168, 2048, True), LayerSpec(384, 7168, 2048, True)
    for spec in (deepseek, kimi):
        assert tiles.w13_by_cycles(spec) and not tiles.w13_through_scratch(spec)
        per_scales = 4096 * 7168 // 16
        assert tiles.scratch_bytes(spec, (4, 9, 4, 4)) == 9 * per_scales  # scales alone
    assert tiles.w13_through_scratch(LayerSpec(8, 2048, 1536, True))
    assert not tiles.w13_by_cycles(LayerSpec(8, 2048, 2048, False))  # not gated


def test_triton_on_cpu_without_the_interpreter_is_refused_before_donation(rng, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = to_jax(random_layer(rng, 2, 128, 64))
    if _triton.missing():
        with pytest.raises(ImportError, match=r"jax-nvfp4\[triton\]"):
            jax_nvfp4.prepare_layer(*layer, backend="triton")
    else:
        with pytest.raises(ValueError, match="CUDA GPU.*cpu"):
            jax_nvfp4.prepare_layer(*layer, backend="triton")
    assert not any(x.is_deleted() for x in layer)


def test_triton_missing_is_an_import_error_naming_the_extra(rng, monkeypatch):
    assert_missing_extra_refused(rng, monkeypatch, "triton")


def test_auto_never_picks_triton_for_cpu_arrays(rng):
    layer = to_jax(random_layer(rng, 2, 128, 64))
    assert _backends.resolve_backend("auto", layer) == "xla"
    assert _backends.resolve_backend("triton", layer, inverse=True) == "xla"


@interpreted
@pytest.mark.skipif(len(jax.devices("cpu")) < 4, reason="needs 4 CPU devices (conftest.py)")
@pytest.mark.parametrize("donate", [True, False])
def test_expert_sharded_layer_is_prepared_per_device(rng, donate):
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((4,), ("expert",), devices=jax.devices("cpu")[:4])
    layer = random_layer(rng, 8, 256, 128)
    arrays = [jax.device_put(x, NamedSharding(mesh, P("expert"))) for x in to_jax(layer)]
    arrays = [jax.jit(lambda a: a.copy(), out_shardings=a.sharding)(a) for a in arrays]
    pointers = [[s.data.unsafe_buffer_pointer() for s in x.addressable_shards] for x in arrays]
    out = jax_nvfp4.prepare_layer(*arrays, backend="triton", donate=donate, chunk_bytes=40000)
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=True)):
        assert g.sharding == arrays[0].sharding or g.sharding.spec == P("expert")
        assert_bytes_equal(g, w, name)
    if donate:
        assert [[s.data.unsafe_buffer_pointer() for s in x.addressable_shards]
                for x in out] == pointers


def test_route_is_xla_with_jax_triton_and_callback_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton, "jax_triton_missing", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _triton.route() == "xla"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tests: jax-triton cannot lower there
    assert _triton.route() == "callback"
    monkeypatch.setattr(_triton, "jax_triton_missing", lambda: "not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _triton.route() == "callback"
    with options.override(triton_route="xla"):
        assert _triton.route() == "xla"
    with pytest.raises(ValueError, match="triton_route"), options.override(triton_route="x"):
        pass
    with pytest.raises(ValueError, match="JAX_NVFP4_TRITON_ROUTE"):
        _triton.route(dataclasses.replace(options.current(), triton_route="callbacks"))


@pytest.mark.skipif(_triton.missing() is not None, reason="needs triton")
def test_xla_route_maps_the_plans_buffers_and_offsets_onto_call_parameters():
    from jax_nvfp4.backends.triton import kernels as k
    spec = LayerSpec(8, 2048, 1536, True)  # 3072 rows: w13 and its scales through scratch
    launches = _triton._plan(spec, (3, 3, 3, 3))
    per = [s[1] * s[2] for s in spec.shapes(padded=True)[:2]]
    # Second chunk's gather (experts 3-5): sources at 3 experts in, scratch (buffer 4) at
    # 0 and after the chunk of w13; its call holds the scratch at parameter 8.
    offsets, consts = k.xla_call_args(launches[2], [0, 1, 2, 3, 8])
    assert offsets[:4] == [3 * per[0] // 16, 0, 3 * per[1] // 16, 3 * per[0] // 16]
    assert [consts[f"X{j}"] for j in range(4)] == [0, 8, 1, 8]
    assert set(k.XLA_KERNELS) == {2, 8, 9, 10}
    for n, fn in k.XLA_KERNELS.items():  # offsets first, then n buffers, then constants
        names = fn.arg_names
        assert names[:8] == [f"o{j}" for j in range(8)]
        assert names[8:8 + n] == [f"b{j}" for j in range(n)] and names[8 + n] == "X0"


_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from jax_nvfp4.backends.triton import program as _triton, kernels as k
from jax_nvfp4.layout.spec import LayerSpec
spec = LayerSpec(64, 7168, 384, True)  # 768 rows: no short cycles, whole rows in place
for n in (8, 9, 10):
    launch = _triton._plan(spec, None if n == 8 else (8, 8, 8, 8))[0 if n < 10 else 1]
    places = {8: list(range(8)), 9: [0, 1, 2, 3, 8], 10: list(range(5))}[n]
    _, consts = k.xla_call_args(launch, places)
    fn = k.XLA_KERNELS[n]
    # buffers as XLA gives them: weights uint8, scales float8_e4m3fn
    sig = {a: "constexpr" if a in consts else "i32" if a[0] == "o" else
           "*fp8e4nv" if a in ("b1", "b3", "b5", "b7") else "*u8" for a in fn.arg_names}
    attrs = {(j,): [["tt.divisibility", 16]] for j, a in enumerate(fn.arg_names) if a[0] == "b"}
    ptx = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=launch.warps)).asm["ptx"]
    print(n, "v4" if "ld.global.v4" in ptx else "scalar")
# The first in-place call with w13 by cycle groups: the four arrays and the table, then
# results. 4096 rows: groups of 16; 1536 rows: groups of 256 (preferred to whole rows).
from jax_nvfp4.backends.triton import tiles
tiles.CYCLES_OVER_WHOLE = tiles.PACK_CYCLES = True
for spec in (LayerSpec(64, 7168, 2048, True), LayerSpec(64, 2048, 768, True)):
    launch = _triton._plan(spec, (8, 8, 8, 8))[0]
    assert launch.segments[1].kind == k.CYCLES
    _, consts = k.xla_call_args(launch, [0, 1, 2, 3, 9, 4])
    fn = k.XLA_KERNELS[10]
    sig = {a: "constexpr" if a in consts else "i32" if a[0] == "o" else "*i32" if a == "b4"
           else "*fp8e4nv" if a in ("b1", "b3", "b6", "b8") else "*u8" for a in fn.arg_names}
    attrs = {(j,): [["tt.divisibility", 16]] for j, a in enumerate(fn.arg_names) if a[0] == "b"}
    ptx = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=launch.warps)).asm["ptx"]
    print("cycles", "v4" if "ld.global.v4" in ptx else "scalar")
"""


@pytest.mark.skipif(_triton.missing() is not None, reason="needs triton")
def test_xla_route_kernels_compile_for_hopper_without_a_gpu():
    """The kernels XLA launches, compiled to PTX for sm_90 here (no GPU; outside the
    interpreter): every buffer picked by constants, 16-byte vector loads kept (offsets
    come in 16-byte units)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode and ("ptxas" in r.stderr.lower() or "GPUTarget" in r.stderr):
        pytest.skip(f"this Triton cannot compile for CUDA here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["8", "v4", "9", "v4", "10", "v4", "cycles", "v4", "cycles", "v4"]


def test_importing_jax_triton_keeps_tritons_cache_dir(monkeypatch, tmp_path):
    """jax-triton 0.3.1 blanks TRITON_CACHE_DIR at import, which breaks Triton's own
    launches afterwards (seen on an H200); the import here puts it back."""
    import sys
    import types

    def fake_import():
        __import__("os").environ["TRITON_CACHE_DIR"] = ""
        return types.ModuleType("jax_triton")

    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Finder("jax_triton", fake_import), *sys.meta_path])
    for value in (str(tmp_path), None):
        monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
        if value is None:
            monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TRITON_CACHE_DIR", value)
        _triton._jax_triton()
        assert __import__("os").environ.get("TRITON_CACHE_DIR") == value


class _Finder:
    """An import hook serving one module from a function (a stand-in jax_triton)."""

    def __init__(self, name, make):
        self.name, self.make = name, make

    def find_spec(self, name, path=None, target=None):
        import importlib.machinery
        if name != self.name:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec):
        return self.make()

    def exec_module(self, module):
        pass
