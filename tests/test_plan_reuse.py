"""A call that matches an earlier one (same shapes, dtypes, shardings, arguments, options)
reuses its plan: the same bytes, and every per-array refusal still holds."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jax_nvfp4
from jax_nvfp4 import options, transform
from jax_nvfp4.layout import reference as _reference
from helpers import random_layer, to_jax


def _bytes(x):
    return np.asarray(x).view(np.uint8)


@pytest.fixture(autouse=True)
def no_plans(monkeypatch):
    monkeypatch.setattr(transform, "_PLANS", {})


def test_a_matching_call_reuses_the_plan_and_gives_the_same_bytes(rng):
    host = random_layer(rng, 3, 256, 64)
    want = _reference.prepare_layer(*host)
    jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    plans = dict(transform._PLANS)
    for donate in (False, True, True):
        out = jax_nvfp4.prepare_layer(*to_jax(host), donate=donate)
        for g, w in zip(out, want):
            np.testing.assert_array_equal(_bytes(g).reshape(w.shape), w)
    donated = len(transform._PLANS) - len(plans)
    assert donated == 1  # one new plan for donate=True, reused by the second call
    again = jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    assert len(transform._PLANS) == len(plans) + 1
    np.testing.assert_array_equal(_bytes(again[0]), want[0])


def test_a_reused_plan_still_refuses_deleted_marked_and_repeated_arrays(rng):
    host = random_layer(rng, 2, 256, 64)
    layer = to_jax(host)
    out = jax_nvfp4.prepare_layer(*to_jax(host), donate=True)  # the plan for these arrays
    with pytest.raises(ValueError, match="already in the TRT-LLM layout"):
        jax_nvfp4.prepare_layer(*out)  # same signature as the inputs: a reused plan
    jax_nvfp4.prepare_layer(*layer)
    with pytest.raises(ValueError, match=r"w13_weight has been deleted"):
        jax_nvfp4.prepare_layer(*layer)
    # Not gated with I = H: w13 and w2 have one shape, so one array can be passed twice.
    square = random_layer(rng, 2, 256, 256, gated=False)
    jax_nvfp4.prepare_layer(*to_jax(square), gated=False)
    fresh = to_jax(square)
    with pytest.raises(ValueError, match="distinct"):
        jax_nvfp4.prepare_layer(fresh[0], fresh[1], fresh[0], fresh[1], gated=False)
    assert not any(x.is_deleted() for x in fresh)


def test_changed_options_or_arguments_plan_again(rng):
    host = random_layer(rng, 2, 256, 64)
    jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    before = len(transform._PLANS)
    with options.override(min_chunk_bytes=1 << 12):
        jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    jax_nvfp4.prepare_layer(*to_jax(host), donate=False, hidden_alignment=128)
    jax_nvfp4.prepare_layer(*to_jax(host, scale_dtype=jnp.uint8), donate=False)
    assert len(transform._PLANS) == before + 3
    with pytest.raises(TypeError, match="hidden_alignment must be an int"):
        jax_nvfp4.prepare_layer(*to_jax(host), donate=False, hidden_alignment=256.0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        jax_nvfp4.prepare_layer(*to_jax(host), chunk_bytes=True)


def test_plans_are_bounded(rng, monkeypatch):
    monkeypatch.setattr(transform, "_MAX_PLANS", 2)
    for e in (1, 2, 3):
        jax_nvfp4.prepare_layer(*to_jax(random_layer(rng, e, 128, 64)), donate=False)
    assert len(transform._PLANS) == 2
    assert [k[0][0][0][0] for k in transform._PLANS] == [2, 3]  # the oldest went first


def test_a_reused_plan_is_decided_again_when_the_environment_changes(rng, monkeypatch):
    # Which packages import (and the Triton interpreter, the route) are asked on every
    # call and compared with what the plan was decided under.
    host = random_layer(rng, 2, 256, 64)
    want = _reference.prepare_layer(*host)
    calls = []
    choose = transform.select.choose
    monkeypatch.setattr(transform.select, "choose",
                        lambda *a, **k: calls.append(1) or choose(*a, **k))
    for _ in range(2):
        jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    assert len(calls) == 1
    monkeypatch.setattr(transform, "_environment", lambda *a: "a package came or went")
    for _ in range(2):
        out = jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
    assert len(calls) == 2  # decided again once, then reused
    np.testing.assert_array_equal(_bytes(out[2]).reshape(want[2].shape), want[2])


def test_one_options_object_in_force_reuses_its_plan_and_is_restored(rng):
    host = random_layer(rng, 2, 256, 64)
    mine = dataclasses.replace(options.current(), min_chunk_bytes=1 << 12)
    with options.using(mine) as o:
        assert o is mine and options.current() is mine
        jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
        before = len(transform._PLANS)
        jax_nvfp4.prepare_layer(*to_jax(host), donate=False)
        assert len(transform._PLANS) == before
    assert options.current() is not mine
    with pytest.raises(TypeError, match="takes an Options"):
        with options.using({"min_chunk_bytes": 1}):
            pass
