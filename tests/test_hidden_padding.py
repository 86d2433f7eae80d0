"""Hidden-size padding (prepare_layer(hidden_alignment=256)): H padded as vLLM 0.33 pads it,
bit for bit, on every backend runnable on CPU, sharded or not; cropped back exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_nvfp4
import vllm_source
from jax_nvfp4.backends import flashinfer as _flashinfer
from jax_nvfp4 import transform as _prepare
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.backends.triton import program as _triton
from jax_nvfp4.layout.spec import LayerSpec
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")

# (E, H, I, gated, hidden_alignment): H padded or not, I padded or not, gated or not.
CASES = [
    (2, 2688, 1856, False, 256),  # Nemotron-3-Nano-30B-A3B (E = 128 there): Hp 2816, Ip 1920
    (2, 2688, 928, True, 256),    # gated, both padded
    (3, 144, 96, True, 256),      # H a multiple of 16 only
    (2, 128, 128, True, 256),     # H = 128 (fine for the layout) padded to the default 256
    (2, 256, 128, True, 256),     # nothing padded: in place
    (2, 384, 64, False, 512),     # alignment 512 (vLLM's for per-token activations, not gated)
    (2, 208, 256, False, 128),    # alignment 128: only to the layout's multiple
]


def _dirty_allocator(shapes):
    """Allocate and free 0xAB-filled buffers of the output sizes first, so that an output byte
    a program failed to write would likely read 0xAB, not a fresh zero page (best effort)."""
    junk = [jnp.full(s, 0xAB, jnp.uint8) for s in shapes]
    jax.block_until_ready(junk)
    del junk


def _padded_zero_mask(spec: LayerSpec):
    """Per array, True where the linear (unprepared, padded) layout holds padding."""
    e, h, i, hp, ip = spec.experts, spec.hidden, spec.intermediate, spec.padded_h, spec.padded_i
    halves = 2 if spec.gated else 1
    masks = []
    for cols, per in ((hp // 2, 2), (hp // 16, 16)):
        m = np.ones((e, halves, ip, cols), bool)
        m[:, :, :i, :h // per] = False
        masks.append(m.reshape(e, halves * ip, cols))
    for cols, per in ((ip // 2, 2), (ip // 16, 16)):
        m = np.ones((e, hp, cols), bool)
        m[:, :h, :i // per] = False
        masks.append(m)
    return masks


@pytest.mark.parametrize("e, h, i, gated, align", CASES)
@pytest.mark.parametrize("donate", [True, False])
def test_padded_layer_equals_reference(rng, e, h, i, gated, align, donate):
    layer = random_layer(rng, e, h, i, gated=gated)
    spec = LayerSpec(e, h, i, gated, hidden_alignment=align)
    _dirty_allocator(spec.shapes(padded=True))
    out = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate,
                                  hidden_alignment=align, chunk_bytes=1 << 16)
    assert [tuple(x.shape) for x in out] == list(spec.shapes(padded=True))
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=gated,
                                                              hidden_alignment=align)):
        assert_bytes_equal(g, w, name)
    # In the linear layout: the padding is exactly zero and the real bytes are the input's.
    back = jax_nvfp4.unprepare_layer(*out, gated=gated, donate=False)
    for name, b, x, pad in zip(NAMES, back, layer, _padded_zero_mask(spec)):
        b = np.asarray(b).view(np.uint8)
        assert not b[pad].any(), f"{name}: padding not zero"
        assert_bytes_equal(b[~pad].reshape(x.shape), x, f"{name} real bytes")


def test_reference_can_fail(rng):
    """Control: a padding column that is not zero is caught by the comparison."""
    layer = random_layer(rng, 2, 144, 64)
    want = _reference.prepare_layer(*layer)
    out = [np.asarray(x).view(np.uint8).copy() for x in jax_nvfp4.prepare_layer(*to_jax(layer))]
    back = jax_nvfp4.unprepare_layer(*to_jax(out))
    bad = np.asarray(back[0]).copy()
    bad[0, 0, -1] = 1  # a byte of w13's H padding
    again = jax_nvfp4.prepare_layer(*to_jax([bad, *map(np.asarray, back[1:])]),
                                    hidden_alignment=256)
    with pytest.raises(AssertionError, match="w13"):
        assert_bytes_equal(again[0], want[0], "w13")


@pytest.mark.parametrize("e, h, i, gated, align", CASES[:4])
def test_padded_layer_equals_vllm(rng, monkeypatch, e, h, i, gated, align):
    """vLLM 0.33's own align_fp4_moe_hidden_dim_for_fi + align_fp4_moe_weights_for_fi +
    prepare_static_weights_for_trtllm_fp4_moe, from its wheel's source; flashinfer's swizzle
    kernel (CUDA only) stood in by the reference's transcription of its offset function."""
    torch = pytest.importorskip("torch")
    flashinfer = pytest.importorskip("flashinfer")
    if vllm_source.load() is None:
        pytest.skip("vLLM 0.33's source is not under .whl/ (see tests/vllm_source.py)")
    monkeypatch.setattr(flashinfer, "nvfp4_block_scale_interleave",
                        lambda t: torch.from_numpy(_reference.swizzle(t.numpy()[None])),
                        raising=False)
    layer = random_layer(rng, e, h, i, gated=gated)
    t = [torch.from_numpy(x.copy()) for x in layer]
    t[1], t[3] = t[1].view(torch.float8_e4m3fn), t[3].view(torch.float8_e4m3fn)
    want = vllm_source.prepare(*t, gated=gated, hidden_alignment=align)
    got = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, hidden_alignment=align)
    for name, g, w in zip(NAMES, got, want):
        assert_bytes_equal(g, w.numpy(), name)


@pytest.mark.parametrize("e, h, i, gated, align", CASES)
@pytest.mark.parametrize("donate", [True, False])
def test_round_trip_crops_back_exactly(rng, e, h, i, gated, align, donate):
    layer = random_layer(rng, e, h, i, gated=gated)
    out = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate,
                                  hidden_alignment=align)
    back = jax_nvfp4.unprepare_layer(*out, gated=gated, donate=donate, hidden_size=h,
                                     intermediate_size=i)
    assert all(x.is_deleted() for x in out) == donate
    for name, b, x in zip(NAMES, back, layer):
        assert_bytes_equal(b, x, name)
    assert [str(x.dtype) for x in back] == ["uint8", "float8_e4m3fn"] * 2


def test_prepare_records_sizes_and_they_crop_back(rng):
    """The tree API: PreparedLayer.hidden_size/intermediate_size are what unprepare needs."""
    layer = random_layer(rng, 2, 2688, 1856, gated=False)
    params = {"layers": [{"moe": dict(zip(NAMES, to_jax(layer)))}]}
    moe = jax_nvfp4.prepare(params, gated=False)["layers"][0]["moe"]
    assert (moe.hidden_size, moe.intermediate_size) == (2688, 1856)
    assert moe["w2_weight"].shape == (2, 2816, 1920 // 2)
    back = jax_nvfp4.unprepare_layer(*(moe[n] for n in NAMES), gated=False,
                                     hidden_size=moe.hidden_size,
                                     intermediate_size=moe.intermediate_size)
    for name, b, x in zip(NAMES, back, layer):
        assert_bytes_equal(b, x, name)


def test_dequantize_reads_padded_h(rng):
    e, h, i = 2, 144, 96
    layer = random_layer(rng, e, h, i, gated=True)
    want = jax_nvfp4.dequantize_layer(*to_jax(layer))
    got = jax_nvfp4.dequantize_layer(*jax_nvfp4.prepare_layer(*to_jax(layer)), layout="trtllm")
    assert got[0].shape == (e, 2 * 128, 256) and got[1].shape == (e, 256, 128)
    w13 = np.asarray(got[0]).reshape(e, 2, 128, 256)
    np.testing.assert_array_equal(w13[:, :, :i, :h].reshape(e, 2 * i, h), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1])[:, :h, :i], np.asarray(want[1]))
    assert not w13[..., h:].any() and not np.asarray(got[1])[:, h:].any()


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.skipif(_triton.missing() is not None or not _triton.interpreting(),
                    reason="needs triton in its interpreter (TRITON_INTERPRET=1, conftest)")
@pytest.mark.parametrize("e, h, i, gated", [(2, 144, 32, True), (2, 176, 48, False),
                                            (2, 128, 64, True)])
@pytest.mark.parametrize("donate", [True, False])
def test_triton_backend(rng, e, h, i, gated, donate):
    layer = random_layer(rng, e, h, i, gated=gated)
    _dirty_allocator(LayerSpec(e, h, i, gated).shapes(padded=True))
    out = jax_nvfp4.prepare_layer(*to_jax(layer), gated=gated, donate=donate, backend="triton")
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=gated)):
        assert_bytes_equal(g, w, name)


@pytest.mark.parametrize("e, h, i, gated", [(3, 144, 96, True), (2, 128, 128, False)])
@pytest.mark.parametrize("donate", [True, False])
def test_pallas_path(rng, e, h, i, gated, donate):
    """The XLA backend's CUDA path (Pallas row kernels), here in Pallas' interpreter."""
    layer = random_layer(rng, e, h, i, gated=gated)
    spec = LayerSpec(e, h, i, gated)
    chunks = _prepare.experts_per_chunk(spec, 30000)
    out = _prepare.compiled(spec, inverse=False, donate=donate, chunks=chunks,
                            pallas=True)(*to_jax(layer))
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=gated)):
        assert_bytes_equal(g, w, name)


@pytest.mark.usefixtures("on_cpu")
@pytest.mark.parametrize("e, h, i, gated", [(3, 144, 96, True), (2, 128, 128, False)])
@pytest.mark.parametrize("donate", [True, False])
def test_flashinfer_backend_program(rng, monkeypatch, stand_in_kernel, e, h, i, gated, donate):
    """backend="flashinfer" pads in XLA, so its kernel sees already padded scale blocks."""
    monkeypatch.setattr(_flashinfer, "_via_ffi", lambda: False)  # torch_bridge
    layer = random_layer(rng, e, h, i, gated=gated)
    spec = LayerSpec(e, h, i, gated)
    chunks = _prepare.experts_per_chunk(spec, 20000)
    out = _prepare.compiled(spec, inverse=False, donate=donate, chunks=chunks,
                            backend="flashinfer")(*to_jax(layer))
    for name, g, w in zip(NAMES, out, _reference.prepare_layer(*layer, gated=gated)):
        assert_bytes_equal(g, w, name)
    assert stand_in_kernel, "the kernel was not called"


def _mesh(shape, names):
    n = int(np.prod(shape))
    return jax.sharding.Mesh(np.array(jax.devices("cpu")[:n]).reshape(shape), names)


@pytest.mark.parametrize("donate", [True, False])
def test_expert_sharded(rng, donate):
    mesh = _mesh((4,), ("e",))
    e, h, i = 8, 2688, 160
    layer = random_layer(rng, e, h, i, gated=True)
    arrays = [jax.device_put(x, NamedSharding(mesh, P("e"))) for x in to_jax(layer)]
    out = jax_nvfp4.prepare_layer(*arrays, donate=donate)
    assert all(x.is_deleted() for x in arrays) == donate
    for name, o, w in zip(NAMES, out, _reference.prepare_layer(*layer)):
        assert o.sharding.spec == P("e") and len(o.addressable_shards) == 4, name
        assert_bytes_equal(o, w, name)
    back = jax_nvfp4.unprepare_layer(*out, hidden_size=h, intermediate_size=i, donate=donate)
    for name, b, x in zip(NAMES, back, layer):
        assert b.sharding.spec == P("e")
        assert_bytes_equal(b, x, name)


def test_tensor_parallel(rng):
    """I split over "t" (each device its own [up; gate] of I / t), H padded on every device."""
    t, e, h, i_local = 2, 4, 144, 48
    i = t * i_local
    w13, s13, w2, s2 = random_layer(rng, e, h, i)
    tp = [x.reshape(e, 2, t, i_local, -1).swapaxes(1, 2).reshape(e, 2 * i, -1) for x in (w13, s13)]
    mesh = _mesh((2, t), ("e", "t"))
    specs = (P("e", "t"), P("e", "t"), P("e", None, "t"), P("e", None, "t"))
    host = [tp[0], tp[1], w2, s2]
    arrays = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(to_jax(host), specs)]
    out = jax_nvfp4.prepare_layer(*arrays)
    ip = 64
    assert out[0].shape == (e, t * 2 * ip, 128) and out[2].shape == (e, 256, t * ip // 2)
    for k, o in enumerate(out):
        for shard in o.addressable_shards:
            ex, j = shard.index[0], int(np.argwhere(mesh.devices == shard.device)[0][1])
            local = [x[ex, :, :] for x in (tp[0][:, j * 2 * i_local:(j + 1) * 2 * i_local],
                                           tp[1][:, j * 2 * i_local:(j + 1) * 2 * i_local],
                                           w2[..., j * i_local // 2:(j + 1) * i_local // 2],
                                           s2[..., j * i_local // 16:(j + 1) * i_local // 16])]
            assert_bytes_equal(shard.data, _reference.prepare_layer(*local)[k], NAMES[k])
    back = jax_nvfp4.unprepare_layer(*out, hidden_size=h, intermediate_size=i)
    for name, b, x in zip(NAMES, back, host):
        assert_bytes_equal(b, x, name)


@pytest.mark.parametrize("align, error, match", [
    (0, ValueError, "positive multiple of 128"),
    (192, ValueError, r"positive multiple of 128 .*got 192"),
    (-256, ValueError, "positive multiple of 128"),
    (256.0, TypeError, "hidden_alignment must be an int"),
    (True, TypeError, "hidden_alignment must be an int"),
])
def test_bad_alignment_refused_before_donation(rng, align, error, match):
    layer = to_jax(random_layer(rng, 2, 144, 64))
    with pytest.raises(error, match=match):
        jax_nvfp4.prepare_layer(*layer, hidden_alignment=align)
    with pytest.raises(error, match=match):
        jax_nvfp4.prepare({"moe": dict(zip(NAMES, layer))}, hidden_alignment=align)
    assert not any(x.is_deleted() for x in layer)


def test_bad_hidden_refused_before_donation(rng):
    e, h, i = 2, 136, 64  # H = 136 holds 8.5 scale blocks of 16
    arrays = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in
              [(e, 2 * i, h // 2), (e, 2 * i, 9), (e, h, i // 2), (e, h, i // 16)]]
    layer = to_jax(arrays)
    with pytest.raises(ValueError, match=r"H = 2 x shape\[2\] = 136 must be a multiple of 16"):
        jax_nvfp4.prepare_layer(*layer)
    assert not any(x.is_deleted() for x in layer)


def test_unprepare_refuses_unprepared_h_and_bad_crops(rng):
    layer = to_jax(random_layer(rng, 2, 144, 96))
    with pytest.raises(ValueError, match="H = 2 x shape.2. = 144 is not a prepared size"):
        jax_nvfp4.unprepare_layer(*layer)  # H = 144 cannot come out of prepare
    out = jax_nvfp4.prepare_layer(*layer)  # Hp = 256, Ip = 128
    for kwargs, error, match in [
        (dict(hidden_size=264), ValueError, "hidden_size = 264 must be .* at most .* 256"),
        (dict(hidden_size=100), ValueError, "hidden_size = 100 must be a positive multiple of 16"),
        (dict(hidden_size=0), ValueError, "hidden_size = 0"),
        (dict(hidden_size=144.0), TypeError, "hidden_size must be an int"),
        (dict(intermediate_size=48), ValueError, "intermediate_size = 48 does not pad"),
        (dict(intermediate_size=144), ValueError, "at most the prepared size 128"),
    ]:
        with pytest.raises(error, match=match):
            jax_nvfp4.unprepare_layer(*out, **kwargs)
        assert not any(x.is_deleted() for x in out), kwargs
    with pytest.raises(TypeError, match="are for unprepare_layer"):
        _prepare.plan_job(out, gated=True, donate=False, backend="xla", chunk_bytes=None,
                          inverse=False, hidden_size=144)


def test_spec_keeps_its_constructor():
    spec = LayerSpec(128, 2688, 1856, False)  # as other modules build it
    assert (spec.padded_h, spec.padded_i, spec.hidden_alignment) == (2816, 1920, 256)
    assert spec.shapes(padded=True)[2] == (128, 2816, 960)
    assert spec.shapes(padded=False)[2] == (128, 2688, 928)
    assert LayerSpec(8, 2688, 1856, False, hidden_alignment=128).padded_h == 2688
    assert not LayerSpec(8, 7168, 2048, True).needs_padding  # DeepSeek-V3
