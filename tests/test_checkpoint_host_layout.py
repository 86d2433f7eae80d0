"""The kernel's layout made on the host while a layer is read (``checkpoint.load.layout_on_host``):
byte for byte what ``prepare_layer`` gives on the device, for every family, padded or not,
sharded or not, whatever the staging chunk; and no XLA program sees the layer."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_nvfp4
from jax_nvfp4.checkpoint import convert as _convert, load as _load
from jax_nvfp4.checkpoint.read import open_checkpoint
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.layout.spec import NAMES, LayerSpec
from jax_nvfp4.testing import write_checkpoint
from ckpt_helpers import GATED, compiled_programs as _compiled, experts_of, stacked
from ckpt_helpers import host_layout as _host_layout

# (family, E, H, I): unpadded; I padded (gated to 64, not gated to 128); H padded to 256,
# with H/16 not a multiple of 4 (scale columns padded inside a 4-column group)
CASES = [("qwen3", 5, 256, 64), ("qwen3", 4, 256, 80), ("qwen3", 3, 400, 64),
         ("qwen3", 3, 2064, 48), ("nemotron_h", 5, 256, 128), ("nemotron_h", 3, 400, 80),
         ("gate_up", 4, 384, 80), ("gate_up_stacked", 6, 256, 96), ("mixtral", 3, 256, 64)]


def _seed(rng):
    return int(rng.integers(2**31))


@pytest.fixture(params=[1 << 30, 1])
def stage(request, monkeypatch):
    """Staging of the whole layer in one task, or of one expert per task."""
    monkeypatch.setattr(_load, "STAGE_BYTES", request.param)
    return request.param


def _load_both(path, monkeypatch, **kw):
    _host_layout(monkeypatch, True)
    host = jax_nvfp4.load(path, **kw)
    _host_layout(monkeypatch, False)
    device = jax_nvfp4.load(path, **kw)
    _host_layout(monkeypatch, None)
    return host, device


@pytest.mark.parametrize("family,e,h,i", CASES)
def test_host_layout_is_prepare_layer(tmp_path, rng, monkeypatch, stage, family, e, h, i):
    tensors = write_checkpoint(tmp_path, naming=family, layers=2, experts=e, hidden=h,
                               intermediate=i, seed=_seed(rng))
    host, device = _load_both(tmp_path, monkeypatch)
    gated = GATED[family]
    for layer in range(2):
        a, b = experts_of(host, family, layer), experts_of(device, family, layer)
        assert isinstance(a, jax_nvfp4.PreparedLayer) and set(a) == set(b)
        assert (a.hidden_size, a.intermediate_size) == (h, i)
        ref = _reference.prepare_layer(*stacked(tensors, family, layer, e), gated=gated)
        for name in a:
            x, y = np.asarray(a[name]), np.asarray(b[name])
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), name
        for name, r in zip(NAMES, ref):
            assert np.asarray(a[name]).view(np.uint8).tobytes() == r.tobytes(), name
        assert "nvfp4_layout" in a  # the marker leaf, as prepare_layer's path gives


def test_sharded_host_layout(tmp_path, rng, monkeypatch, stage):
    e = 8
    tensors = write_checkpoint(tmp_path, layers=1, experts=e, hidden=400, intermediate=80,
                               seed=_seed(rng))
    s = NamedSharding(Mesh(np.array(jax.devices("cpu")[:4]), ("expert",)), P("expert"))
    host, device = _load_both(tmp_path, monkeypatch, sharding=s)
    a, b = experts_of(host, "qwen3", 0), experts_of(device, "qwen3", 0)
    ref = _reference.prepare_layer(*stacked(tensors, "qwen3", 0, e))
    for name, r in zip(NAMES, ref):
        assert a[name].sharding == b[name].sharding == s, name
        for sa, sb in zip(a[name].addressable_shards, b[name].addressable_shards):
            assert sa.device == sb.device and sa.index == sb.index, name
            assert np.asarray(sa.data).tobytes() == np.asarray(sb.data).tobytes(), name
        assert np.asarray(a[name]).view(np.uint8).tobytes() == r.tobytes(), name


def test_lay_out_is_the_device_program(rng):
    # lay_out alone, on random bytes, array by array, for a block of experts of a layer
    for e, h, i, gated in [(3, 256, 64, True), (2, 2064, 80, True), (4, 400, 80, False),
                           (2, 512, 256, False)]:
        spec = LayerSpec(e, h, i, gated)
        src = [rng.integers(0, 256, s, dtype=np.uint8) for s in spec.shapes(padded=False)]
        want = jax_nvfp4.prepare_layer(*(jax.numpy.asarray(x) for x in src), gated=gated,
                                       donate=False, backend="xla")
        for k, (x, w) in enumerate(zip(src, want)):
            out = np.full(w.shape, 0xA5, np.uint8)  # every byte must be written
            pad = np.zeros(w.shape, np.uint8) if spec.needs_padding else None
            _load.lay_out(x, out, spec, k, padded=pad)
            assert out.tobytes() == np.asarray(w).view(np.uint8).tobytes(), (spec, NAMES[k])


def test_no_program_sees_the_layer(tmp_path, rng, monkeypatch, caplog):
    # on CPU, load and convert lay the layer out on the host: neither prepare_layer nor any
    # XLA program of a layer-sized array runs (forced off, prepare_layer's program runs)
    e, h, i = 9, 640, 112  # shapes no other test compiles (padded: Hp 768, Ip 128)
    write_checkpoint(tmp_path / "src", layers=2, experts=e, hidden=h, intermediate=i,
                     seed=_seed(rng))
    calls = []
    real = _load.prepare_layer
    monkeypatch.setattr(_load, "prepare_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    sizes = [f"{e},{2 * i}", f"{e},{h}", f"{e},{2 * 128}", f"{e},{768}"]
    logs = _compiled(caplog, lambda: jax.block_until_ready(jax_nvfp4.load(tmp_path / "src")))
    logs += _compiled(caplog, lambda: _convert.convert(tmp_path / "src", tmp_path / "dst",
                                                       progress=False))
    touching = [m for m in logs if any(f"[{s}," in m for s in sizes)]
    # only the marks' fingerprint (64 bytes gathered per array, as after prepare_layer)
    assert not calls and all(m.startswith("Compiling jit(f) ") for m in touching), touching
    _host_layout(monkeypatch, False)
    logs = _compiled(caplog, lambda: jax.block_until_ready(jax_nvfp4.load(tmp_path / "src")))
    touching = [m for m in logs if any(f"[{s}," in m for s in sizes)]
    assert len(calls) == 2 and [m for m in touching if "jit(program)" in m], touching


def test_the_rule(monkeypatch):
    cpu = jax.devices("cpu")[0]
    assert _load.layout_on_host([cpu]) and _load.layout_on_host(None)

    class Gpu:
        platform = "gpu"

    assert not _load.layout_on_host([Gpu()]) and not _load.layout_on_host([cpu, Gpu()])
    _host_layout(monkeypatch, False)
    assert not _load.layout_on_host([cpu]) and not _load.layout_on_host(None)
    _host_layout(monkeypatch, True)
    assert _load.layout_on_host([Gpu()])


def test_convert_host_layout_is_the_device_one(tmp_path, rng, monkeypatch):
    src = tmp_path / "src"
    write_checkpoint(src, naming="nemotron_h", layers=2, experts=3, hidden=400,
                     intermediate=80, seed=_seed(rng))
    _convert.convert(src, tmp_path / "host", progress=False)
    _host_layout(monkeypatch, False)
    _convert.convert(src, tmp_path / "device", progress=False)
    files = sorted(p.name for p in (tmp_path / "host").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "device").iterdir())
    for f in files:
        assert (tmp_path / "host" / f).read_bytes() == (tmp_path / "device" / f).read_bytes(), f
    with open_checkpoint(tmp_path / "host") as ckpt:
        assert ckpt.prepared and len(ckpt.moe) == 2


@pytest.mark.parametrize("gated,e,h,i", [(True, 3, 400, 80), (False, 2, 384, 80),
                                         (True, 2, 256, 64)])
def test_pad_into_is_the_programs_padding_and_writes_every_byte(rng, gated, e, h, i):
    # What a layer prepared on its devices is padded by as it is read (read_layer(padded=
    # True)), against the padding of prepare_layer's own program (layout.steps.pads).
    from jax_nvfp4.layout import steps

    spec = LayerSpec(e, h, i, gated)
    for k, (stored, padded, pad) in enumerate(zip(spec.shapes(padded=False),
                                                 spec.shapes(padded=True), steps.pads(spec))):
        src = rng.integers(1, 256, stored, dtype=np.uint8)
        dst = np.full(padded, 0xAB, np.uint8)  # every byte must be written
        _load.pad_into(src, dst, spec, k)
        np.testing.assert_array_equal(dst, np.asarray(pad(jax.numpy.asarray(src))), NAMES[k])
