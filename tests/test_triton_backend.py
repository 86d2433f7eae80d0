"""backend="triton": the Triton kernels' bytes, in place and not, on CPU in Triton's interpreter.

The same kernels run compiled on CUDA (tests/test_gpu_triton.py); here they check the
index formulas, the chunking through scratch, aliasing and the refusals.
"""

from __future__ import annotations

import jax
import pytest

import jax_nvfp4
from jax_nvfp4 import _backends, _prepare, _reference, _triton
from jax_nvfp4._spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax

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
    (4, 128, 1024, True, 1 << 16),   # w13 rows wider than one block of columns
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
    back = jax_nvfp4.unprepare_layer(*out, gated=gated, backend="triton")
    for name, g, w in zip(NAMES, back,
                          _reference._pad_i(*layer, i, spec.padded_i, gated)
                          if spec.needs_padding else layer):
        assert_bytes_equal(g, w, f"round trip {name}")


@interpreted
@pytest.mark.parametrize("gated", [True, False])
def test_in_place_program_needs_one_chunk_of_scratch(gated):
    e, h, i = 8, 256, 128
    spec = LayerSpec(e, h, i, gated)
    one_pass = _triton.w13_in_one_pass(spec)
    chunks = _prepare.experts_per_chunk(spec, 70000, w13_together=not one_pass)
    program = _prepare._compiled(spec, False, True, chunks, "triton")
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


def test_auto_takes_triton_for_large_arrays_and_one_pass_in_place():
    deepseek, tp8, qwen3 = (LayerSpec(*s, True) for s in ((256, 7168, 2048), (256, 7168, 256),
                                                          (128, 2048, 768)))
    for donate in (True, False):
        assert _prepare.auto_takes_triton(deepseek, donate=donate)  # w13: 3.76 GB
        assert not _prepare.auto_takes_triton(qwen3, donate=donate)
    assert _prepare.auto_takes_triton(tp8, donate=True)
    assert not _prepare.auto_takes_triton(tp8, donate=False)
    assert not _prepare.auto_takes_triton(tp8, donate=True, inverse=True)


def test_w13_moves_in_one_pass_up_to_1024_rows():
    assert _triton.w13_in_one_pass(LayerSpec(256, 7168, 256, True))     # DeepSeek-V3 TP8
    assert _triton.w13_in_one_pass(LayerSpec(8, 2048, 512, True))       # 2I = 1024
    assert not _triton.w13_in_one_pass(LayerSpec(256, 7168, 2048, True))  # 4096 rows
    assert not _triton.w13_in_one_pass(LayerSpec(128, 2048, 768, True))   # 1536: not 2**k
    assert not _triton.w13_in_one_pass(LayerSpec(8, 256, 128, False))     # not gated


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
    layer = to_jax(random_layer(rng, 2, 128, 64))
    monkeypatch.setattr(_triton.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"jax-nvfp4\[triton\]"):
        jax_nvfp4.prepare_layer(*layer, backend="triton")
    assert not any(x.is_deleted() for x in layer)


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
