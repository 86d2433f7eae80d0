"""jax_nvfp4.kernels.trtllm_fp4_moe: argument plumbing and refusals, on CPU.

The kernel runs only on Blackwell, so the FFI target is bound on "cpu" to a stand-in
with the launcher's calling convention (flashinfer 0.7.4's 46 positional arguments): it
records what it receives and writes a checkable output. Checked: every argument the
launcher would get (tensors by shape, dtype, bytes and pointer; scalars; the Nones),
the activation quantization against quantize_nvfp4 on independently padded input, the
valid sizes of a padded layer, and every refusal.
"""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax_tvm_ffi")
import tvm_ffi

import jax_nvfp4
from jax_nvfp4.numerics import quant as _quant
from jax_nvfp4.kernels import _ffi, _moe
from jax_nvfp4.kernels import trtllm_fp4_moe as _trtllm_fp4_moe


def trtllm_fp4_moe(*args, **kwargs):
    # The stand-in records its arguments when XLA runs it, asynchronously: wait for it.
    return jax.block_until_ready(_trtllm_fp4_moe(*args, **kwargs))

SEEN: list = []


def _bytes(t):
    n = int(np.prod(t.shape)) * {"float32": 4, "bfloat16": 2, "int32": 4}.get(str(t.dtype), 1)
    return np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(t.data_ptr())).copy()


def _launcher(*args):
    """The launcher's arguments, recorded; output[t, :] = sum_k w[t, k] * o2[id - offset]."""
    SEEN.append([(("tensor", tuple(a.shape), str(a.dtype), a.data_ptr(), _bytes(a))
                  if isinstance(a, tvm_ffi.Tensor) else a) for a in args])
    ids = _bytes(args[2]).view(np.int32).reshape(args[2].shape)
    w = _bytes(args[3])
    w = (w.view(np.float32) if str(args[3].dtype) == "float32" else
         (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)).reshape(ids.shape)
    o2 = _bytes(args[19]).view(np.float32)
    offset, e = args[27], args[28]
    local = (ids >= offset) & (ids < offset + e)
    val = (w * np.where(local, o2[np.clip(ids - offset, 0, e - 1)], 0)).sum(1)
    out = args[34]
    bf16 = (val.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncate
    row = np.repeat(bf16[:, None], out.shape[1], axis=1)
    ctypes.memmove(out.data_ptr(), row.ctypes.data, row.nbytes)


@pytest.fixture(autouse=True)
def stand_in(on_cpu):
    _moe._STAND_INS.setdefault("cpu", _launcher)
    SEEN.clear()


def _layer(rng, e=4, hp=256, ip=128, *, gated=True, h=None, i=None):
    r1 = (2 if gated else 1) * ip
    arrays = {
        "w13_weight": rng.integers(0, 256, (e, r1, hp // 2), dtype=np.uint8),
        "w13_weight_scale": rng.integers(0, 256, (e, r1, hp // 16), dtype=np.uint8),
        "w2_weight": rng.integers(0, 256, (e, hp, ip // 2), dtype=np.uint8),
        "w2_weight_scale": rng.integers(0, 256, (e, hp, ip // 16), dtype=np.uint8)}
    out = {k: jnp.asarray(v) for k, v in arrays.items()}
    for k in ("w13_weight_scale", "w2_weight_scale"):
        out[k] = jax.lax.bitcast_convert_type(out[k], jnp.float8_e4m3fn)
    u = lambda *s: jnp.asarray(rng.uniform(0.5, 2, s).astype(np.float32))  # noqa: E731
    cols = (e, 2) if gated else (e,)
    out.update(jax_nvfp4.kernel_scales(u(*cols), u(*cols), u(e), u(e), gated=gated))
    return jax_nvfp4.PreparedLayer(out, hidden_size=h, intermediate_size=i)


def _routing(rng, t, k, n, dtype=jnp.float32):
    ids = np.stack([rng.choice(n, k, replace=False) for _ in range(t)]).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(rng.uniform(0, 1, (t, k)).astype(np.float32)).astype(dtype)


def _x(rng, t, h):
    return jnp.asarray(rng.normal(size=(t, h)).astype(np.float32)).astype(jnp.bfloat16)


def _tensor(arg):
    assert isinstance(arg, tuple) and arg[0] == "tensor", arg
    return arg[1:]


@pytest.mark.parametrize("jit", [False, True])
def test_the_launcher_gets_flashinfers_arguments(rng, jit):
    layer = _layer(rng)
    x = _x(rng, 5, 256)
    ids, w = _routing(rng, 5, 2, 4)
    f = jax.jit(_trtllm_fp4_moe) if jit else _trtllm_fp4_moe
    out = jax.block_until_ready(f(x, layer, ids, w))
    (a,) = SEEN
    assert len(a) == 46  # flashinfer 0.7.4's trtllm_fp4_block_scale_moe
    assert a[0] == 2 and a[1] is None and a[4] is None  # UnpackedPrecomputed, no logits/bias
    assert _tensor(a[2])[:2] == ((5, 2), "int32") and (_tensor(a[2])[3].view(np.int32)
                                                        == np.asarray(ids).ravel()).all()
    assert _tensor(a[3])[:2] == ((5, 2), "float32")
    packed, sf = _quant.quantize_nvfp4(x, layer["hidden_states_global_scale"])
    hs, hss = _tensor(a[5]), _tensor(a[6])
    assert hs[:2] == ((5, 128), "uint8") and (hs[3] == np.asarray(packed).ravel()).all()
    assert hss[:2] == ((5, 16), "float8_e4m3fn")
    assert (hss[3] == np.asarray(sf).view(np.uint8).ravel()).all()
    for pos, key, dt in ((7, "w13_weight", "uint8"), (8, "w13_weight_scale", "float8_e4m3fn"),
                         (14, "w2_weight", "uint8"), (15, "w2_weight_scale", "float8_e4m3fn"),
                         (17, "output1_scale_scalar", "float32"),
                         (18, "output1_scale_gate_scalar", "float32"),
                         (19, "output2_scale_scalar", "float32")):
        shape, dtype, ptr, data = _tensor(a[pos])
        assert shape == tuple(layer[key].shape) and dtype == dt, key
        assert (data == np.asarray(layer[key]).view(np.uint8).ravel()).all(), key
        if not jit:  # the layer's own buffers, no copy
            assert ptr == layer[key].unsafe_buffer_pointer(), key
    assert a[9:14] == [None] * 5 and a[16] is None and a[20] is None
    assert a[21:27] == [4, 2, 0, None, None, 128]  # experts, top_k, shared, groups, Ip
    assert a[27:33] == [0, 4, None, 1, True, True]  # offset, local E, scaling, method, fin, pdl
    assert a[33] == 3 and _tensor(a[34])[:2] == ((5, 256), "bfloat16")
    assert list(a[35]) == [-1, -1] and a[36] is True and a[37] is None
    assert list(a[38]) == [] and list(a[39]) == [] and a[40] is False
    assert a[41] is None and a[42] is None and a[43] is None and a[44] is False
    assert a[45] == -1
    o2 = np.asarray(layer["output2_scale_scalar"])
    want = (np.asarray(w) * o2[np.asarray(ids)]).sum(1)
    assert out.shape == (5, 256) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32)[:, 0], want, rtol=1e-2)


def test_a_padded_layer_passes_its_valid_sizes(rng):
    layer = _layer(rng, hp=512, ip=256, h=400, i=200)
    x = _x(rng, 3, 400)
    ids, w = _routing(rng, 3, 3, 4, jnp.bfloat16)
    out = trtllm_fp4_moe(x, layer, ids, w)
    (a,) = SEEN
    assert out.shape == (3, 400) and _tensor(a[34])[0] == (3, 400)
    assert a[26] == 256 and a[41] == 400 and a[42] == 200
    assert _tensor(a[3])[1] == "bfloat16"
    # x is padded with zeros to the prepared H before quantization
    packed, _ = _quant.quantize_nvfp4(jnp.concatenate(
        [x, jnp.zeros((3, 112), x.dtype)], axis=1), layer["hidden_states_global_scale"])
    assert (_tensor(a[5])[3] == np.asarray(packed).ravel()).all()
    trtllm_fp4_moe(jnp.pad(x, ((0, 0), (0, 112))), layer, ids, w)  # the padded width too
    assert len(SEEN) == 2


def test_relu2_expert_parallel_shard(rng):
    layer = _layer(rng, e=3, gated=False)
    x = _x(rng, 4, 256)
    ids, w = _routing(rng, 4, 2, 12)
    out = trtllm_fp4_moe(x, layer, ids, w, activation="relu2", num_experts=12,
                         local_expert_offset=6, enable_pdl=False, routing_method_type=5,
                         workspace_bytes=4096)
    (a,) = SEEN
    assert a[21] == 12 and a[27] == 6 and a[28] == 3 and a[33] == 6
    assert a[30] == 5 and a[32] is False
    assert _tensor(a[43])[:2] == ((4096,), "uint8")  # the XLA workspace as workspace_buffer
    o2 = np.asarray(layer["output2_scale_scalar"])
    i = np.asarray(ids)
    local = (i >= 6) & (i < 9)
    want = (np.asarray(w) * np.where(local, o2[np.clip(i - 6, 0, 2)], 0)).sum(1)
    np.testing.assert_allclose(np.asarray(out, np.float32)[:, 0], want, rtol=1e-2, atol=1e-6)


def _bad(rng, change):
    layer = _layer(rng)
    args = dict(x=_x(rng, 2, 256), layer=layer, ids=_routing(rng, 2, 2, 4)[0],
                w=_routing(rng, 2, 2, 4)[1], kw={})
    change(args)
    return lambda: trtllm_fp4_moe(args["x"], args["layer"], args["ids"], args["w"], **args["kw"])


def _set(**kv):
    def change(a):
        for k, v in kv.items():
            if k.startswith("layer."):
                lay = dict(a["layer"])
                if v is None:
                    del lay[k[6:]]
                else:
                    lay[k[6:]] = v(lay[k[6:]]) if callable(v) else v
                a["layer"] = jax_nvfp4.PreparedLayer(lay)
            elif k == "kw":
                a["kw"] = v
            else:
                a[k] = v(a[k]) if callable(v) else v
    return change


@pytest.mark.parametrize("change, err, match", [
    (_set(layer=lambda l: dict(l)), ValueError, "TRT-LLM layout.*prepare it first"),
    (_set(layer=[1]), TypeError, "PreparedLayer mapping"),
    (_set(**{"layer.output2_scale_scalar": None}), ValueError, "missing output2_scale_scalar"),
    (_set(**{"layer.w13_weight": lambda a: a.astype(jnp.int8)}), TypeError, "w13_weight.*uint8"),
    (_set(**{"layer.w2_weight_scale": lambda a: a[:, :128]}), ValueError, "w2_weight_scale.*shape"),
    (_set(**{"layer.output1_scale_scalar": lambda a: a[:2]}), ValueError, "output1_scale_scalar"),
    (_set(**{"layer.hidden_states_global_scale": lambda a: a.astype(jnp.bfloat16)}),
     ValueError, "hidden_states_global_scale"),
    (_set(x=lambda x: x[:, :128]), ValueError, r"x: expected \[T, 256\]"),
    (_set(x=lambda x: x.astype(jnp.int32)), TypeError, "x: expected bfloat16"),
    (_set(ids=lambda i: i.astype(jnp.int64) if jax.config.jax_enable_x64 else i.astype(
        jnp.int16)), ValueError, "topk_ids: expected int32"),
    (_set(ids=lambda i: i[:1]), ValueError, r"topk_ids: expected int32 \[2, top_k\]"),
    (_set(w=lambda w: w[:, :1]), ValueError, "topk_weights"),
    (_set(kw=dict(activation="relu2")), ValueError, "gated layers take 'swiglu'"),
    (_set(kw=dict(activation="gelu")), ValueError, "activation must be one of"),
    (_set(kw=dict(num_experts=3)), ValueError, "num_experts=3 is less"),
    (_set(kw=dict(local_expert_offset=-1)), ValueError, "local_expert_offset"),
    (_set(kw=dict(enable_pdl=1)), ValueError, "enable_pdl must be a bool"),
    (_set(kw=dict(workspace_bytes=-5)), ValueError, "workspace_bytes"),
])
def test_bad_arguments_are_refused_before_any_call(rng, change, err, match):
    with pytest.raises(err, match=match):
        _bad(rng, change)()
    assert not SEEN


@pytest.mark.parametrize("hp, ip, match", [(384, 128, "not a multiple of 256"),
                                           (256, 192, "not a multiple of 128")])
def test_sizes_the_kernel_cannot_take_are_refused(rng, hp, ip, match):
    layer = _layer(rng, hp=hp, ip=ip)
    ids, w = _routing(rng, 2, 2, 4)
    with pytest.raises(ValueError, match=match):
        trtllm_fp4_moe(_x(rng, 2, hp), layer, ids, w)


def test_cpu_arrays_without_a_stand_in_are_refused(rng, monkeypatch):
    monkeypatch.setattr(_moe, "_STAND_INS", {})
    ids, w = _routing(rng, 2, 2, 4)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*on cpu.*moe_forward"):
        trtllm_fp4_moe(_x(rng, 2, 256), _layer(rng), ids, w)


class _FakeGPU:
    platform = "gpu"
    device_kind = "NVIDIA H200"
    compute_capability = "9.0"


def test_a_gpu_that_is_not_blackwell_is_named():
    with pytest.raises(RuntimeError, match=r"10\.0 or 10\.3.*NVIDIA H200 has compute "
                                           r"capability 9\.0 \(sm_90\)"):
        _moe._refuse_device(_FakeGPU())
    blackwell = type("B200", (_FakeGPU,), {"compute_capability": "10.0"})()
    _moe._refuse_device(blackwell)  # accepted


def test_missing_packages_are_named(rng, monkeypatch):
    ids, w = _routing(rng, 2, 2, 4)
    layer, x = _layer(rng), _x(rng, 2, 256)
    monkeypatch.setattr(_ffi, "missing", lambda: "jax-tvm-ffi is not installed; pip install y")
    with pytest.raises(ImportError, match="jax-tvm-ffi is not installed"):
        trtllm_fp4_moe(x, layer, ids, w)
    monkeypatch.undo()
    monkeypatch.setattr(_moe, "_STAND_INS", {})
    monkeypatch.setattr(_moe.importlib.util, "find_spec",
                        lambda name: None if name == "flashinfer" else object())
    with pytest.raises(ImportError, match="flashinfer-python is not installed"):
        trtllm_fp4_moe(x, layer, ids, w)


def test_the_adaptor_follows_the_installed_launchers_signature():
    # The launcher's parameter list, read from the installed flashinfer's source: a changed
    # signature (a new flashinfer) fails here, not silently on a Blackwell GPU.
    import pathlib
    import re
    flashinfer = pytest.importorskip("flashinfer")
    src = pathlib.Path(flashinfer.__file__).parent / "data/csrc/trtllm_fused_moe_kernel_launcher.cu"
    if not src.exists():
        pytest.skip("this flashinfer ships no launcher source")
    m = re.search(r"Array<Optional<Tensor>> trtllm_fp4_block_scale_moe\((.*?)\)\s*\{",
                  src.read_text(), re.S)
    names = [p.split()[-1].lstrip("&") for p in m.group(1).replace("\n", " ").split(",")]
    if flashinfer.__version__ != _moe.WRITTEN_FOR:
        pytest.skip(f"written for flashinfer {_moe.WRITTEN_FOR}, this is {flashinfer.__version__}")
    filled = {0: "routing_input_mode", 2: "topk_ids", 3: "topk_weights", 5: "hidden_states",
              6: "hidden_states_scale", 7: "gemm1_weights", 8: "gemm1_weights_scale",
              14: "gemm2_weights", 15: "gemm2_weights_scale", 17: "output1_scales_scalar",
              18: "output1_scales_gate_scalar", 19: "output2_scales_scalar", 21: "num_experts",
              22: "top_k", 26: "intermediate_size", 27: "local_expert_offset",
              28: "local_num_experts", 30: "routing_method_type", 31: "do_finalize",
              32: "enable_pdl", 33: "act_type", 34: "output", 35: "config_index",
              41: "valid_hidden_size", 42: "valid_intermediate_size", 43: "workspace_buffer",
              44: "query_workspace_size", 45: "nvfp4_4over6_code"}
    assert len(names) == 46
    assert {i: names[i] for i in filled} == filled
