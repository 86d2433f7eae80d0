"""prepare loses nothing: a layer failing at run time keeps the earlier layers' results;
tracers, empty layers and copies of prepared arrays are refused clearly, inputs alive."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4 import options
from jax_nvfp4.tree import marks as _marks
from jax_nvfp4.layout import reference as _reference
from jax_nvfp4.tree import prepare as _tree
from helpers import assert_bytes_equal, random_layer, to_jax

NAMES = ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")


def _model(rng, layers=4, e=2, h=256, i=64):
    host = [random_layer(rng, e, h, i) for _ in range(layers)]
    params = {"layers": [{"moe": dict(zip(NAMES, to_jax(x)), router=jnp.ones(3)), "k": k}
                         for k, x in enumerate(host)]}
    return params, host


class OutOfMemory(RuntimeError):
    pass


def _failing_runner(monkeypatch, at: int, *, after_running: bool = False):
    """The per-layer runner, failing on its call number ``at`` (before or after the program:
    after it, the layer's inputs are consumed and its outputs dropped)."""
    real, calls = _tree.run_job, []

    def run(job):
        calls.append(job)
        if len(calls) == at + 1:
            if after_running:
                jax.block_until_ready(real(job))
            raise OutOfMemory("RESOURCE_EXHAUSTED: Out of memory allocating 3.76 GiB")
        return real(job)

    monkeypatch.setattr(_tree, "run_job", run)
    return calls


@pytest.mark.parametrize("donate", [True, False])
def test_failure_in_a_later_layer_keeps_the_earlier_ones(rng, monkeypatch, donate):
    params, host = _model(rng)
    _failing_runner(monkeypatch, at=2)
    with pytest.raises(jax_nvfp4.PrepareError, match=r"params\['layers'\]\[2\]\['moe'\] failed "
                                                     r"while running \(OutOfMemory") as info:
        jax_nvfp4.prepare(params, donate=donate)
    err = info.value
    assert isinstance(err.__cause__, OutOfMemory) and isinstance(err, RuntimeError)
    assert err.path == "['layers'][2]['moe']"
    assert err.prepared == ["['layers'][0]['moe']", "['layers'][1]['moe']"]
    assert err.remaining == ["['layers'][2]['moe']", "['layers'][3]['moe']"]
    layers = err.params["layers"]
    for k in (0, 1):  # prepared, bit for bit, and their inputs consumed when donated
        moe = layers[k]["moe"]
        assert isinstance(moe, jax_nvfp4.PreparedLayer) and moe.hidden_size == 256
        for name, want in zip(NAMES, _reference.prepare_layer(*host[k])):
            assert_bytes_equal(moe[name], want, f"layer {k} {name}")
        assert moe["router"] is params["layers"][k]["moe"]["router"]
        assert all(params["layers"][k]["moe"][n].is_deleted() == donate for n in NAMES)
    for k in (2, 3):  # as passed in, alive and unchanged
        assert layers[k]["moe"] is params["layers"][k]["moe"]
        for name, x in zip(NAMES, host[k]):
            assert not layers[k]["moe"][name].is_deleted()
            assert_bytes_equal(layers[k]["moe"][name], x, f"layer {k} {name}")
    assert [layer["k"] for layer in layers] == [0, 1, 2, 3]

    # Resume: the prepared layers are skipped, the rest prepared.
    monkeypatch.undo()
    out = jax_nvfp4.prepare(err.params, donate=donate, skip_prepared=True)
    for k in range(4):
        assert out["layers"][k]["moe"].intermediate_size == 64
        for name, want in zip(NAMES, _reference.prepare_layer(*host[k])):
            assert_bytes_equal(out["layers"][k]["moe"][name], want, f"resumed layer {k} {name}")
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare(out)  # without skip_prepared: refused as before
    with pytest.raises(TypeError, match="skip_prepared must be a bool"):
        jax_nvfp4.prepare(out, skip_prepared=1)


def test_failure_after_the_program_ran_is_reported_with_the_rest(rng, monkeypatch):
    """The worst case: the failing layer's own inputs were consumed; the others are safe."""
    params, host = _model(rng, layers=3)
    _failing_runner(monkeypatch, at=1, after_running=True)
    with pytest.raises(jax_nvfp4.PrepareError) as info:
        jax_nvfp4.prepare(params)
    layers = info.value.params["layers"]
    for name, want in zip(NAMES, _reference.prepare_layer(*host[0])):
        assert_bytes_equal(layers[0]["moe"][name], want, name)
    assert all(not layers[2]["moe"][n].is_deleted() for n in NAMES)


def test_markers_that_cannot_be_placed_after_a_failure_lose_no_layer(rng, monkeypatch):
    """The done layers' markers go to the device in one transfer when the run stops; if that
    fails too (the device out of memory), those layers still come back prepared (marked in
    this process, so a resume skips them), without marker leaves."""
    params, host = _model(rng, layers=3)
    _failing_runner(monkeypatch, at=2)

    def no_room(values, likes):
        raise OutOfMemory("RESOURCE_EXHAUSTED: Out of memory allocating 32 bytes")

    monkeypatch.setattr(_marks, "marker_arrays", no_room)
    with pytest.raises(jax_nvfp4.PrepareError, match=r"\[2\]\['moe'\] failed") as info:
        jax_nvfp4.prepare(params)
    layers = info.value.params["layers"]
    for k in (0, 1):
        moe = layers[k]["moe"]
        assert isinstance(moe, jax_nvfp4.PreparedLayer) and _marks.MARKER_KEY not in moe
        for name, want in zip(NAMES, _reference.prepare_layer(*host[k])):
            assert_bytes_equal(moe[name], want, f"layer {k} {name}")
    monkeypatch.undo()
    out = jax_nvfp4.prepare(info.value.params, skip_prepared=True)
    for k in range(3):
        for name, want in zip(NAMES, _reference.prepare_layer(*host[k])):
            assert_bytes_equal(out["layers"][k]["moe"][name], want, f"resumed layer {k} {name}")


def test_failure_in_the_first_layer(rng, monkeypatch):
    params, host = _model(rng, layers=2)
    _failing_runner(monkeypatch, at=0)
    with pytest.raises(jax_nvfp4.PrepareError, match="the 0 layer") as info:
        jax_nvfp4.prepare(params)
    assert info.value.prepared == [] and len(info.value.remaining) == 2
    assert all(not params["layers"][0]["moe"][n].is_deleted() for n in NAMES)


@pytest.mark.parametrize("fn", ["prepare_layer", "unprepare_layer"])
def test_tracers_are_a_clear_type_error(rng, fn):
    layer = to_jax(random_layer(rng, 2, 256, 64))
    if fn == "unprepare_layer":
        layer = jax_nvfp4.prepare_layer(*layer)
    call = getattr(jax_nvfp4, fn)
    with pytest.raises(TypeError, match=rf"{fn}\(\) got a tracer for w13_weight.*outside the "
                                        r"traced function.*dequantize_layer"):
        jax.jit(lambda *xs: call(*xs))(*layer)
    with pytest.raises(TypeError, match=rf"{fn}\(\) got a tracer"):
        jax.vmap(lambda *xs: call(*xs))(*[x[None] for x in layer])
    assert not any(x.is_deleted() for x in layer)


def test_prepare_under_jit_names_prepare(rng):
    params, _ = _model(rng, layers=1)
    with pytest.raises(TypeError, match=r"prepare\(\) got a tracer for "
                                        r"params\['layers'\]\[0\]\['moe'\]\.w13_weight"):
        jax.jit(jax_nvfp4.prepare)(params)


def test_the_jittable_alternative_works_under_jit(rng):
    host = random_layer(rng, 2, 256, 64)
    prepared = jax_nvfp4.prepare_layer(*to_jax(host))
    got = jax.jit(lambda *xs: jax_nvfp4.dequantize_layer(*xs, layout="trtllm"))(*prepared)
    want = jax_nvfp4.dequantize_layer(*to_jax(host))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("e, h, i", [(0, 256, 64), (2, 0, 64), (2, 256, 0)])
def test_empty_layers_are_a_value_error(e, h, i):
    shapes = [(e, 2 * i, h // 2), (e, 2 * i, h // 16), (e, h, i // 2), (e, h, i // 16)]
    layer = to_jax([np.zeros(s, np.uint8) for s in shapes])
    for call in (jax_nvfp4.prepare_layer, jax_nvfp4.unprepare_layer, jax_nvfp4.dequantize_layer):
        with pytest.raises(ValueError, match="empty array .* at least one expert"):
            call(*layer)
    with pytest.raises(ValueError, match=r"params\['m'\]\.w13_weight: empty array"):
        jax_nvfp4.prepare({"m": dict(zip(NAMES, layer))})
    assert not any(x.is_deleted() for x in layer)


@pytest.mark.parametrize("copy", ["jnp.array", "numpy", "device_put", "sharded"])
def test_copies_of_prepared_arrays_are_refused(rng, copy):
    host = random_layer(rng, 4, 256, 128)
    out = jax_nvfp4.prepare_layer(*to_jax(host))
    if copy == "sharded":
        mesh = jax.make_mesh((2,), ("e",), devices=jax.devices("cpu")[:2])
        s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("e"))
        out = [jax.device_put(x, s) for x in out]
        _marks.mark(*out)  # as sharded prepare outputs are marked
    make = {"jnp.array": jnp.array, "numpy": np.asarray, "sharded": jnp.array,
            "device_put": lambda x: jax.device_put(x, jax.devices("cpu")[1])}[copy]
    copies = [make(x) for x in out]
    assert not any(_marks.is_marked(c) for c in copies)
    with pytest.raises(ValueError, match="w13_weight holds the bytes of an array that came out "
                                         "of prepare"):
        jax_nvfp4.prepare_layer(*copies)
    with pytest.raises(ValueError, match=r"params\['m'\]\.w13_weight holds the bytes"):
        jax_nvfp4.prepare({"m": dict(zip(NAMES, copies))})
    assert not any(c.is_deleted() for c in copies if isinstance(c, jax.Array))
    # ... also after the original is gone
    del out
    with pytest.raises(ValueError, match="holds the bytes"):
        jax_nvfp4.prepare_layer(*copies)


def test_a_copy_of_one_array_is_named(rng):
    host = random_layer(rng, 2, 256, 64)
    out = jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    mixed = to_jax(host)
    mixed[3] = jnp.array(out[3])  # only the w2 scales are a copy
    with pytest.raises(ValueError, match="^w2_weight_scale holds the bytes"):
        jax_nvfp4.prepare_layer(*mixed)


def test_no_false_positives(rng):
    """Fresh layers, the same raw layer twice, round trips and zeros are all prepared."""
    host = random_layer(rng, 2, 256, 64)
    first = jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    jax_nvfp4.prepare_layer(*to_jax(host), donate=False)  # the same raw bytes again
    back = jax_nvfp4.unprepare_layer(*first)
    again = jax_nvfp4.prepare_layer(*back)  # the round trip's bytes are unprepared
    jax_nvfp4.prepare_layer(*to_jax(random_layer(rng, 2, 256, 64)))
    zeros = [jnp.zeros(x.shape, x.dtype) for x in again]  # the same prepared or not
    jax_nvfp4.prepare_layer(*zeros, donate=False)
    jax_nvfp4.prepare_layer(*zeros, donate=False)


def test_copy_detection_can_be_switched_off(rng):
    out = jax_nvfp4.prepare_layer(*to_jax(random_layer(rng, 2, 256, 64)), donate=False)
    with options.override(check_copies=False):
        jax_nvfp4.prepare_layer(*[jnp.array(x) for x in out])  # shuffled twice, as asked
