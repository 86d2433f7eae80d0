"""Reading ModelOpt NVFP4 checkpoints (and prepared ones): index, naming, validation.

A checkpoint is a directory of safetensors shards with ``model.safetensors.index.json``
(or a single ``model.safetensors``). :func:`open_checkpoint` reads only the headers and
checks everything (shards, every expert's tensors, shapes, dtypes, the quantization
config) before any tensor data is read, so a bad checkpoint fails before anything is
loaded or written. Tensor data is then read one tensor (or one expert of a stacked
tensor) at a time.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import threading
import weakref
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from ..numerics.scales import KERNEL_NAMES, kernel_scales
from ..layout.spec import BLOCK, NAMES, LayerSpec, check_arrays

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PREPARED_JSON = "jax_nvfp4.json"  # written next to the shards of a prepared checkpoint
FORMAT = "jax_nvfp4.prepared"
LAYOUT = "trtllm_fp4_block_scale_moe"
SCALE_NAMES = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")

# naming -> projection names of (gate, up, down); gate None: not gated (w13 = up only)
NAMINGS = {
    "qwen3": ("gate_proj", "up_proj", "down_proj"),      # Qwen3-MoE, DeepSeek, Gemma-4, ...
    "mixtral": ("w1", "w3", "w2"),                        # Mixtral, MiniMax-M2
    "nemotron_h": (None, "up_proj", "down_proj"),         # Nemotron-H: ReLU^2, no gate
    "gate_up": ("gate_up_proj", "gate_up_proj", "down_proj"),          # experts.{e}.gate_up_proj
    "gate_up_stacked": ("gate_up_proj", "gate_up_proj", "down_proj"),  # experts.gate_up_proj
}
FUSED = ("gate_up", "gate_up_stacked")  # one tensor holds rows [gate; up] (HF/vLLM order)
FIELDS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
_EXPERT = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\."
    r"(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj|w1|w2|w3)"
    r"\.(?P<field>weight|weight_scale|weight_scale_2|input_scale)$"
)
# one tensor for all experts: experts.gate_up_proj [E, 2I, H/2], ..._weight_scale, ...
_STACKED = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<proj>gate_up_proj|down_proj)"
    r"(?P<field>|_weight_scale|_weight_scale_2|_input_scale)$"
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# config.json fields holding the routed expert count, by family (also under text_config)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# model_type -> the family's name as users know it
FAMILIES = {"qwen3_moe": "Qwen3-MoE", "qwen2_moe": "Qwen2-MoE", "deepseek_v3": "DeepSeek-V3",
            "deepseek_v2": "DeepSeek-V2", "mixtral": "Mixtral", "minimax_m2": "MiniMax-M2",
            "nemotron_h": "Nemotron-H", "gemma4": "Gemma-4", "gemma4_text": "Gemma-4",
            "llama4": "Llama-4", "gpt_oss": "gpt-oss", "glm4_moe": "GLM-4-MoE",
            "kimi_k2": "Kimi-K2"}
# numpy has no float8, so safetensors' numpy reader cannot return F8 tensors
# (safetensors issue #682): those are read as bytes and viewed with ml_dtypes.
_BYTES_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
# stored dtype of each stacked array (prepared checkpoints) / expert field
_DT = {"w13_weight": "U8", "w13_weight_scale": "F8_E4M3", "w2_weight": "U8",
       "w2_weight_scale": "F8_E4M3", "weight": "U8", "weight_scale": "F8_E4M3"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and tensor."""


def layer_index(name: str) -> int | None:
    """The decoder layer ``L`` of a tensor named ``...layers.{L}...``, else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _extent(shape: tuple[int, ...], index) -> tuple[int, int, tuple[int, ...]]:
    """``(first element, element count, shape)`` of ``tensor[index]`` in C order.

    ``index``: None (all), an int (one element of axis 0: an expert of a stacked tensor),
    a slice of axis-0 rows, or ``(int, slice)`` (rows of one expert of a stacked tensor),
    a contiguous range in every case (fused ``gate_up_proj`` halves are read this way).
    """
    if index is None:
        return 0, int(np.prod(shape)), tuple(shape)
    if isinstance(index, tuple):
        e, rows = index
        inner = int(np.prod(shape[2:]))
        r0, r1, _ = rows.indices(shape[1])
        return (e * shape[1] + r0) * inner, (r1 - r0) * inner, (r1 - r0, *shape[2:])
    inner = int(np.prod(shape[1:]))
    if isinstance(index, slice):
        r0, r1, _ = index.indices(shape[0])
        return r0 * inner, (r1 - r0) * inner, (r1 - r0, *shape[1:])
    return int(index) * inner, inner, tuple(shape[1:])


class _Shard:
    """One safetensors file, opened once.

    ``safe_open`` checks the header against the file (a truncated shard fails
    here) and reads every numpy dtype; float8 tensors are read as bytes at
    the offsets of the same header.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = safe_open(str(path), framework="numpy")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: shard not found") from None
        except SafetensorError as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({e}); is it truncated?") from None
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            self.header = json.loads(fh.read(n))
        self.metadata = self.header.pop("__metadata__", None) or {}
        self._start = 8 + n

    def info(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """``(safetensors dtype code, shape)`` of ``name``, or None if absent."""
        h = self.header.get(name)
        return None if h is None else (h["dtype"], tuple(h["shape"]))

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Tensor ``name`` (or ``name[index]``, see :func:`_extent`) as a new numpy array."""
        dtype, shape = self.info(name)
        if dtype not in _BYTES_DTYPES:
            return self._f.get_tensor(name) if index is None else self._f.get_slice(name)[index]
        begin, _ = self.header[name]["data_offsets"]
        first, count, shape = _extent(shape, index)  # float8: one byte an element
        begin, end = begin + first, begin + first + count
        out = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as fh:
            fh.seek(self._start + begin)
            if fh.readinto(out) != out.size:
                raise CheckpointError(f"{self.path}: tensor {name!r} is cut short; truncated?")
        return out.view(_BYTES_DTYPES[dtype]).reshape(shape)

    # -- bulk reads into caller's buffers (the loader's fast path) ---------------------

    def span(self, name: str, index: int | None = None) -> tuple[int, int]:
        """``(file offset, nbytes)`` of tensor ``name`` (or its slice ``[index]`` along axis 0).

        The same bytes as :meth:`read` returns (safetensors stores them raw, C order).
        """
        _, shape = self.info(name)
        begin, end = self.header[name]["data_offsets"]
        if index is not None:
            itemsize = (end - begin) // max(1, int(np.prod(shape)))
            first, count, _ = _extent(shape, index)
            begin, end = begin + first * itemsize, begin + (first + count) * itemsize
        return self._start + begin, end - begin

    def _descriptor(self) -> int:
        fd = getattr(self, "_fd", None)
        if fd is None:
            with _FD_LOCK:
                fd = getattr(self, "_fd", None)
                if fd is None:
                    try:
                        fd = os.open(self.path, os.O_RDONLY)
                    except FileNotFoundError:
                        raise CheckpointError(f"{self.path}: shard not found") from None
                    weakref.finalize(self, os.close, fd)
                    self._fd = fd
        return fd


_FD_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class MoELayer:
    """One MoE layer of a checkpoint: where its experts are and their sizes.

    ``spec`` gives the stored shapes (``spec.shapes(padded=False)``; for a prepared
    checkpoint, ``H`` and ``I`` already padded) and whether the layer is gated
    (``spec.gated``: SwiGLU-style w13 = ``[up; gate]``; not gated, e.g. Nemotron-H's
    ReLU^2 experts: w13 = up only); ``hidden`` and ``intermediate`` are the model's valid
    ``H`` and ``I``. ``naming`` (a key of :data:`NAMINGS`) says where each expert's
    tensors are; None for a prepared layer, whose stacked tensors are
    ``{prefix}.{name}``. ``kernel_stored``: a prepared layer holds the kernel's scalars
    (converted checkpoints written before them do not). ``family``: the config's
    ``model_type`` (None when unknown).
    """

    prefix: str
    layer: int | None
    spec: LayerSpec
    intermediate: int
    naming: str | None
    hidden: int
    kernel_stored: bool = False
    family: str | None = None

    @property
    def prepared(self) -> bool:
        return self.naming is None

    @property
    def gated(self) -> bool:
        return self.spec.gated

    @property
    def padded_hidden(self) -> int:
        """``H`` in the kernel's layout (stored, or as loading pads it)."""
        return self.spec.hidden if self.prepared else self.spec.padded_h

    @property
    def padded_intermediate(self) -> int:
        """``I`` in the kernel's layout (stored, or as loading pads it)."""
        return self.spec.intermediate if self.prepared else self.spec.padded_i

    @property
    def stacked(self) -> bool:
        """One tensor holds every expert (``experts.gate_up_proj`` ``[E, 2I, H/2]``)."""
        return self.naming == "gate_up_stacked"

    def projections(self) -> tuple[str, ...]:
        """The projections stored: ``("gate", "up", "down")``, or ``("up", "down")``."""
        return ("gate", "up", "down") if self.gated else ("up", "down")

    def expert(self, e: int, proj: str, field: str) -> str:
        """Source tensor name of expert ``e``; ``proj`` is "gate", "up" or "down".

        Fused namings give gate and up the same tensor (rows ``[gate; up]``); a stacked
        one gives every expert the same tensor (``[E, ...]``; scalars ``[E]`` or ``[]``).
        """
        name = dict(zip(("gate", "up", "down"), NAMINGS[self.naming]))[proj]
        if name is None:
            raise ValueError(f"{self.prefix}: not gated, no {proj} projection")
        if self.stacked:
            return f"{self.prefix}.{name}" + ("" if field == "weight" else f"_{field}")
        return f"{self.prefix}.{e}.{name}.{field}"

    def parts(self, array: str, e: int) -> list[tuple[str, object, int]]:
        """Pieces of expert ``e`` of stacked ``array``: ``(tensor, index, first row)``.

        ``index`` selects what :meth:`Checkpoint.read` (and ``span``) read of the
        tensor: None (all), an int (expert ``e`` of a stacked tensor), a slice of rows,
        or ``(e, slice of rows)``; always a contiguous range of the file.
        """
        if self.prepared:
            return [(f"{self.prefix}.{array}", e, 0)]
        field = "weight_scale" if array.endswith("scale") else "weight"
        at = e if self.stacked else None
        if array.startswith("w2"):
            return [(self.expert(e, "down", field), at, 0)]
        i = self.intermediate
        if not self.gated:
            return [(self.expert(e, "up", field), at, 0)]
        # w13 rows are [up; gate], as the kernel wants; fused checkpoints store [gate; up]
        if self.naming in FUSED:
            name = self.expert(e, "up", field)
            up, gate = slice(i, 2 * i), slice(0, i)
            if self.stacked:
                up, gate = (e, up), (e, gate)
            return [(name, up, 0), (name, gate, i)]
        return [(self.expert(e, "up", field), None, 0),
                (self.expert(e, "gate", field), None, i)]


class Checkpoint:
    """A validated checkpoint directory; use :func:`open_checkpoint`. Closes its shards on exit."""

    def __init__(self, path: Path, weight_map: dict[str, str], index_file: Path):
        self.path, self.weight_map, self.index_file = path, weight_map, index_file
        self.shards: dict[str, _Shard] = {}
        self._scales: dict[str, dict[str, np.ndarray]] = {}  # read once, by layer prefix
        for name, file in weight_map.items():
            if file not in self.shards:
                self.shards[file] = _Shard(path / file)
            if self.shards[file].info(name) is None:
                raise CheckpointError(
                    f"{path / file}: tensor {name!r} (listed in {index_file.name}) is not in "
                    "this shard")
        self.prepared_info = _read_json(path / PREPARED_JSON)
        if self.prepared_info is not None and self.prepared_info.get("format") != FORMAT:
            raise CheckpointError(f"{path / PREPARED_JSON}: not a {FORMAT} description")
        self.config = _read_json(path / "config.json") or {}
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{path / 'config.json'}: not a JSON object")
        self.quant, self.quant_file = _check_quant(path)
        self.naming: str | None = None
        self.family: str | None = _model_type(self.config)
        self.moe: list[MoELayer] = (self._prepared_layers() if self.prepared
                                    else self._source_layers())
        if self.prepared:
            taken = {f"{x.prefix}.{n}" for x in self.moe
                     for n in NAMES + SCALE_NAMES + KERNEL_NAMES}
        else:
            taken = {n for n in weight_map if _EXPERT.match(n) or _STACKED.match(n)}
        self.other = [n for n in weight_map if n not in taken]

    @property
    def prepared(self) -> bool:
        return self.prepared_info is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shards.clear()

    def file(self, name: str) -> Path:
        return self.path / self.weight_map[name]

    def info(self, name: str):
        return self.shards[self.weight_map[name]].info(name)

    def nbytes(self, name: str) -> int:
        begin, end = self.shards[self.weight_map[name]].header[name]["data_offsets"]
        return end - begin

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Tensor ``name`` (or expert ``index`` of a stacked one) as numpy; float8 via ml_dtypes."""
        return self.shards[self.weight_map[name]].read(name, index)

    def span(self, name: str, index: int | None = None) -> tuple["_Shard", int, int]:
        """``(shard, file offset, nbytes)`` of what :meth:`read` would return."""
        shard = self.shards[self.weight_map[name]]
        return (shard, *shard.span(name, index))

    def scales(self, layer: MoELayer) -> dict[str, np.ndarray]:
        """The per-expert scalars of ``layer`` as float32 ``[E, 2]`` (gate, up) and ``[E]``.

        Not gated: ``w13_weight_scale_2`` and ``w13_input_scale`` are ``[E]`` (up's).

        Every value is checked positive and finite (a zero, negative, infinite or NaN
        scale is a broken checkpoint: the error names the file and tensor). Read once.
        """
        if layer.prefix not in self._scales:
            self._scales[layer.prefix] = self._read_scales(layer)
        return self._scales[layer.prefix]

    def _read_scales(self, layer: MoELayer) -> dict[str, np.ndarray]:
        if layer.prepared:
            out = {n: self.read(f"{layer.prefix}.{n}") for n in SCALE_NAMES}
            for n, x in out.items():
                self._check_values(f"{layer.prefix}.{n}", x)
            return out
        n_e = layer.spec.experts

        def get(proj, field):
            if layer.stacked:  # one tensor, [E] or a scalar shared by every expert
                name = layer.expert(0, proj, field)
                x = np.asarray(self.read(name), np.float32).reshape(-1)
                self._check_values(name, x)
                return np.broadcast_to(x, (n_e,)).copy()
            names = [layer.expert(e, proj, field) for e in range(n_e)]
            out = np.array([self.read(n).reshape(()) for n in names], np.float32)
            if not (np.isfinite(out) & (out > 0)).all():
                bad = int(np.argmin(np.isfinite(out) & (out > 0)))
                self._check_values(names[bad], out[bad])
            return out

        if layer.gated:  # [E, 2]: columns gate, up
            w13 = {n: np.stack([get("gate", f), get("up", f)], axis=1) for n, f in
                   (("w13_weight_scale_2", "weight_scale_2"), ("w13_input_scale", "input_scale"))}
        else:  # [E]: the up projection's
            w13 = {"w13_weight_scale_2": get("up", "weight_scale_2"),
                   "w13_input_scale": get("up", "input_scale")}
        return {**w13, "w2_weight_scale_2": get("down", "weight_scale_2"),
                "w2_input_scale": get("down", "input_scale")}

    def kernel_scales(self, layer: MoELayer, scales: dict) -> dict[str, np.ndarray]:
        """The kernel's scalars of ``layer`` (see :func:`kernel_scales`), float32 numpy.

        A prepared layer's stored ones (checked positive and finite); computed from
        ``scales`` (as :meth:`scales` returns them) for the others and for prepared
        checkpoints written before convert stored them.
        """
        if layer.kernel_stored:
            out = {}
            for n in KERNEL_NAMES:
                x = self.read(f"{layer.prefix}.{n}")
                out[n] = x.reshape(()) if n == "hidden_states_global_scale" else x
                self._check_values(f"{layer.prefix}.{n}", out[n])
            return out
        with jax.default_device(jax.local_devices(backend="cpu")[0]):  # a few floats, on host
            return {n: np.asarray(x) for n, x in
                    kernel_scales(**scales, gated=layer.gated).items()}

    def _check_values(self, name: str, x):
        x = np.asarray(x)
        ok = np.isfinite(x) & (x > 0)
        if not ok.all():
            where = tuple(int(i) for i in np.argwhere(~ok)[0])
            at = f" [{', '.join(map(str, where))}]" if where else ""
            self._fail(name, f"value{at} {float(x[where])} is not a positive finite scale: the "
                             "checkpoint is broken (weight_scale_2 and input_scale must be "
                             "finite and > 0)")

    def groups(self, layers=None) -> list[tuple[int | None, list[MoELayer], list[str]]]:
        """``[(L, moe layers, other tensors)]`` per decoder layer ``L`` (None: outside layers).

        With ``layers`` (decoder layer indices) only those layers are kept, plus the
        tensors outside any layer (embeddings, final norm, lm_head).
        """
        have = {layer_index(n) for n in self.weight_map} - {None}
        if layers is not None:
            layers = {int(x) for x in layers}
            if missing := sorted(layers - have):
                raise CheckpointError(
                    f"{self.path}: no decoder layer {missing} (it has layers "
                    f"{_ranges(sorted(have))})")
        keys = [None] + sorted(have if layers is None else layers)
        out = {k: ([], []) for k in keys}
        for layer in self.moe:
            if layer.layer in out:
                out[layer.layer][0].append(layer)
        for name in self.other:
            if (k := layer_index(name)) in out:
                out[k][1].append(name)
        return [(k, *out[k]) for k in keys if out[k] != ([], [])]

    # -- validation -----------------------------------------------------------------

    def _fail(self, name: str, msg: str):
        raise CheckpointError(f"{self.file(name)}: tensor {name!r}: {msg}")

    def _expect(self, name: str, dtype: str, shape: tuple[int, ...], how: str = "",
                scalar_ok: bool = False):
        got_dtype, got_shape = self.info(name)
        if got_dtype != dtype:
            self._fail(name, f"expected dtype {dtype}, got {got_dtype}")
        if (shape == () or scalar_ok) and int(np.prod(got_shape)) == 1:  # scalars: [] or [1]
            return
        if got_shape != shape:
            self._fail(name, f"expected shape {list(shape)}{how}, got {list(got_shape)}")

    def _source_layers(self) -> list[MoELayer]:
        found: dict[str, dict] = {}  # prefix -> {"experts": {e}, "projs": {proj}, "stacked": bool}
        for name in self.weight_map:
            if m := _EXPERT.match(name):
                d = found.setdefault(m["prefix"], {"experts": set(), "projs": set()})
                d["experts"].add(int(m["e"]))
                d["projs"].add(m["proj"])
            elif m := _STACKED.match(name):
                d = found.setdefault(m["prefix"], {"experts": set(), "projs": set()})
                d["projs"].add("stacked " + m["proj"])
        if not found:
            raise CheckpointError(
                f"{self.path}: no NVFP4 MoE experts found (no tensor named "
                "'<...>.experts.<e>.{gate_proj,up_proj,down_proj|w1,w3,w2|gate_up_proj}.weight'"
                " or '<...>.experts.gate_up_proj')")
        layers = [self._source_layer(prefix, d) for prefix, d in found.items()]
        namings = sorted({x.naming for x in layers})
        if len(namings) != 1:
            raise CheckpointError(
                f"{self.index_file}: MoE layers use different expert namings {namings}: "
                + "; ".join(f"{x.prefix}: {x.naming}" for x in layers[:4]))
        self.naming = namings[0]
        return layers

    def _naming(self, prefix: str, projs: set) -> str:
        """The naming of one layer from the projections its tensors name."""
        where = f"{self.index_file}: {prefix}"
        if any(p.startswith("stacked ") for p in projs):
            if projs != {"stacked gate_up_proj", "stacked down_proj"}:
                raise CheckpointError(
                    f"{where}: stacked expert tensors {sorted(projs)}: expected "
                    "'experts.gate_up_proj' and 'experts.down_proj' (and nothing per expert)")
            return "gate_up_stacked"
        for naming, names in NAMINGS.items():
            if naming != "gate_up_stacked" and projs == {n for n in names if n is not None}:
                break
        else:
            raise CheckpointError(
                f"{where}: expert projections {sorted(projs)} match no known naming "
                + ", ".join(f"{k}: {sorted(n for n in v if n)}" for k, v in NAMINGS.items()
                            if k != "gate_up_stacked"))
        nongated = _non_gated(self.config)
        if naming == "nemotron_h" and not nongated:
            raise CheckpointError(
                f"{where}: the experts have up_proj and down_proj but no gate_proj, and "
                f"{self.path / 'config.json'} does not say the MoE is non-gated (model_type "
                "'nemotron_h' or mlp_hidden_act 'relu2'): is the gate missing?")
        if naming != "nemotron_h" and nongated:
            raise CheckpointError(
                f"{where}: {self.path / 'config.json'} says the experts are non-gated "
                f"(ReLU^2: up_proj and down_proj only), but they have {sorted(projs)}")
        return naming

    def _expected_experts(self, prefix: str) -> list[tuple[int, str]]:
        """``[(E, where it is said)]``: config.json's expert count and the router's rows."""
        out = []
        field, count = _config_count(self.config)
        if count is not None:
            out.append((count, f"{self.path / 'config.json'} {field} = {count}"))
        parent = prefix[: -len(".experts")]
        for router in (f"{parent}.gate.weight", f"{parent}.router.weight",
                       f"{parent}.router.proj.weight"):  # most / gpt-oss, Llama-4 / Gemma-4
            if router in self.weight_map:
                rows = self.info(router)[1][0] if self.info(router)[1] else None
                if rows is not None:
                    out.append((rows, f"router {router!r} has {rows} rows"))
                break
        return out

    def _check_count(self, prefix: str, have: set[int] | int, first_name: str) -> int:
        """The layer's expert count, checked against config.json and the router: a
        checkpoint whose index lost an expert (e.g. the last one) must not load E - 1."""
        where = f"layer {layer_index(prefix + '.')} ({prefix})"
        if isinstance(have, int):  # stacked: axis 0 of the tensors
            present, got = set(range(have)), f"{first_name!r} holds {have} experts"
        else:
            present, got = have, f"the index has experts {_ranges(sorted(have))}"
        expected = self._expected_experts(prefix)
        if len({c for c, _ in expected}) > 1:
            raise CheckpointError(f"{self.index_file}: {where}: the expert counts disagree: "
                                  + "; ".join(w for _, w in expected))
        want = expected[0][0] if expected else max(present) + 1
        missing = sorted(set(range(want)) - present)
        extra = sorted(present - set(range(want)))
        if missing or extra:
            said = "; ".join(w for _, w in expected) or f"expert ids up to {want - 1}"
            what = (f"no tensors for expert{'s' if len(missing) > 1 else ''} "
                    f"{_ranges(missing)}" if missing else
                    f"expert{'s' if len(extra) > 1 else ''} {_ranges(extra)} beyond {want}")
            raise CheckpointError(
                f"{self.index_file}: {where}: {what} ({said}; {got}): the checkpoint is "
                f"incomplete or not the model its config describes; refusing to load "
                f"{len(present)} of {want} experts")
        return want

    def _source_layer(self, prefix: str, d: dict) -> MoELayer:
        naming = self._naming(prefix, d["projs"])
        gated = NAMINGS[naming][0] is not None
        probe = MoELayer(prefix, layer_index(prefix + "."), LayerSpec(1, 0, 0, gated), 0,
                         naming, hidden=0, family=self.family)
        first = probe.expert(0, "gate" if gated else "up", "weight")
        if probe.stacked:
            for proj in probe.projections():
                for field in FIELDS:
                    if (name := probe.expert(0, proj, field)) not in self.weight_map:
                        raise CheckpointError(f"{self.index_file}: tensor {name!r} is missing "
                                              f"(stacked experts of {prefix})")
            shape = self.info(first)[1]
            if len(shape) != 3:
                self._fail(first, f"expected U8 [E, 2I, H/2] (stacked experts, rows [gate; "
                                  f"up]), got {list(shape)}")
            e_count = self._check_count(prefix, shape[0], first)
        else:
            e_count = self._check_count(prefix, d["experts"], first)
            for e in range(e_count):
                for proj in probe.projections():
                    for field in FIELDS:
                        name = probe.expert(e, proj, field)
                        if name not in self.weight_map:
                            raise CheckpointError(
                                f"{self.index_file}: tensor {name!r} is missing (expert {e} "
                                f"of {prefix}, which has {e_count} experts)")
        dtype, shape = self.info(first)
        lead = shape[:1] if probe.stacked else ()
        rows_per = 2 if naming in FUSED else 1  # fused: [gate; up] rows
        if dtype != "U8" or len(shape) != 2 + len(lead):
            dims = ("E, " if lead else "") + ("2I" if rows_per == 2 else "I")
            self._fail(first, f"expected U8 [{dims}, H/2] (packed e2m1), got {dtype} "
                              f"{list(shape)}")
        rows, h = shape[-2], 2 * shape[-1]
        i = rows // rows_per
        if probe.stacked:
            down = self.info(probe.expert(0, "down", "weight"))[1]
            if len(down) == 3 and down[1:] != (h, i // 2) \
                    and down[1:] == (shape[-1] // 4, 2 * shape[-2]):
                self._fail(first, f"looks transposed ([E, H/2, 2I]: the BMM layout of "
                                  f"Llama-4/gpt-oss experts, down_proj {list(down)}); only "
                                  "[E, 2I, H/2] (rows [gate; up]) is supported")
        if h % BLOCK:
            self._fail(first, f"hidden size H = 2 x shape[{len(shape) - 1}] = {h} must be a "
                              f"multiple of {BLOCK} (one scale per {BLOCK} values; loading pads "
                              "it to the kernel's alignment)")
        if rows % rows_per or i % BLOCK:
            what = "shape[-2] / 2" if rows_per == 2 else "shape[0]"
            self._fail(first, f"intermediate size I = {what} = {rows / rows_per:g} must be a "
                              f"multiple of {BLOCK} (one scale "
                              f"per {BLOCK} values)")
        r = rows_per * i
        want = {("up", "weight"): (*lead, r, h // 2),
                ("up", "weight_scale"): (*lead, r, h // BLOCK),
                ("down", "weight"): (*lead, h, i // 2),
                ("down", "weight_scale"): (*lead, h, i // BLOCK)}
        how = f" (as {first}: H={h}, I={i})"
        for e in range(1 if probe.stacked else e_count):
            for proj in probe.projections():
                for field in FIELDS:
                    name = probe.expert(e, proj, field)
                    key = ("down" if proj == "down" else "up", field)
                    if probe.stacked and key not in want:  # [E] per expert or one []
                        self._expect(name, "F32", (e_count,), how, scalar_ok=True)
                    else:
                        self._expect(name, _DT.get(field, "F32"), want.get(key, ()), how)
        self._check_mixed(prefix, probe, e_count)
        layer = dataclasses.replace(probe, spec=LayerSpec(e_count, h, i, gated), intermediate=i,
                                    hidden=h)
        _check_spec(layer, self.path)
        return layer

    def _check_mixed(self, prefix: str, probe: MoELayer, e_count: int):
        """MIXED_PRECISION: the per-module table must mark every expert projection NVFP4."""
        table = self.quant.get("quantized_layers")
        if self.quant.get("quant_algo") != "MIXED_PRECISION":
            return
        for e in range(1 if probe.stacked else e_count):
            for proj in probe.projections():
                name = probe.expert(e, proj, "weight")  # the module: name less ".weight"
                module = name if probe.stacked else name.rsplit(".", 1)[0]
                key, entry = _lookup(table, module)
                algo = entry.get("quant_algo") if isinstance(entry, dict) else None
                if entry is None:
                    raise CheckpointError(
                        f"{self.quant_file}: quant_algo MIXED_PRECISION, but "
                        f"quantized_layers has no entry for {module!r} (an MoE expert "
                        "projection): its quantization is unknown; jax_nvfp4 loads NVFP4 "
                        "experts only")
                if str(algo).upper() != "NVFP4":
                    raise CheckpointError(
                        f"{self.quant_file}: quantized_layers[{key!r}] is {algo!r} for the MoE "
                        f"expert {module!r}; jax_nvfp4 loads NVFP4 experts only (other modules "
                        "may use any quantization: they pass through unchanged)")
                if entry.get("group_size", BLOCK) != BLOCK:
                    raise CheckpointError(
                        f"{self.quant_file}: quantized_layers[{key!r}].group_size is "
                        f"{entry['group_size']!r}; NVFP4 uses {BLOCK}")

    def _prepared_layers(self) -> list[MoELayer]:
        out = []
        layers = self.prepared_info.get("moe_layers", {})
        if not isinstance(layers, dict):
            raise CheckpointError(f"{self.path / PREPARED_JSON}: 'moe_layers' is not a mapping")
        for prefix, d in layers.items():
            e, h, i, hp, ip = self._sizes(prefix, d)
            # the stored sizes, padded H and I: spec.shapes(padded=False) are the stored shapes
            gated = d.get("gated", self.prepared_info.get("gated", True))
            if not isinstance(gated, bool):
                raise CheckpointError(f"{self.path / PREPARED_JSON}: moe_layers[{prefix!r}]: "
                                      f"'gated' must be true or false, got {gated!r}")
            spec = LayerSpec(e, hp, ip, gated)
            present = [f"{prefix}.{n}" in self.weight_map for n in KERNEL_NAMES]
            if any(present) and not all(present):  # none: converted before they were stored
                self._need(f"{prefix}.{KERNEL_NAMES[present.index(False)]}")
            layer = MoELayer(prefix, layer_index(prefix + "."), spec, i, None, hidden=h,
                             kernel_stored=all(present), family=self.family)
            for name, shape in zip(NAMES, spec.shapes(padded=False)):
                self._need(f"{prefix}.{name}")
                self._expect(f"{prefix}.{name}", _DT[name], shape)
            for name in SCALE_NAMES:
                self._need(f"{prefix}.{name}")
                self._expect(f"{prefix}.{name}", "F32",
                             (e, 2) if gated and name.startswith("w13") else (e,))
            if layer.kernel_stored:
                for name in KERNEL_NAMES:
                    self._expect(f"{prefix}.{name}", "F32",
                                 () if name == "hidden_states_global_scale" else (e,))
            _check_spec(layer, self.path)
            out.append(layer)
        return out

    def _sizes(self, prefix: str, d) -> tuple[int, int, int, int, int]:
        """``(E, H, I, padded H, padded I)`` of a prepared layer from jax_nvfp4.json."""
        where = f"{self.path / PREPARED_JSON}: moe_layers[{prefix!r}]"
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: expected a mapping, got {d!r}")
        # "padded_hidden" is absent from checkpoints converted before H was padded
        d = {"padded_hidden": d.get("hidden"), **d}
        keys = ("experts", "hidden", "intermediate", "padded_hidden", "padded_intermediate")
        for k in keys:
            v = d.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise CheckpointError(f"{where}: {k!r} must be a positive int, got {v!r}")
        e, h, i, hp, ip = (d[k] for k in keys)
        if hp < h or ip < i:
            raise CheckpointError(
                f"{where}: padded sizes (H={hp}, I={ip}) smaller than the valid ones "
                f"(H={h}, I={i})")
        return e, h, i, hp, ip

    def _need(self, name):
        if name not in self.weight_map:
            raise CheckpointError(
                f"{self.index_file}: tensor {name!r} is missing (listed in {PREPARED_JSON})")


def _check_spec(layer: MoELayer, path: Path):
    """The core's own validation of the stacked layer, on shapes only."""
    arrays = [jax.ShapeDtypeStruct(s, np.uint8) for s in layer.spec.shapes(padded=False)]
    check_arrays(arrays, gated=layer.gated, prepared=layer.prepared,
                 where=f"{path}: {layer.prefix}.")


def _read_json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _check_quant(path: Path) -> tuple[dict, Path]:
    """The quantization config and its file; refuses anything but ModelOpt NVFP4 with
    16-value blocks, or MIXED_PRECISION with a per-module ``quantized_layers`` table
    (checked per expert by the layers)."""
    config = _read_json(path / "config.json") or {}
    sources = [(path / "config.json", "quantization_config", config.get("quantization_config")),
               (path / "hf_quant_config.json", "quantization",
                (_read_json(path / "hf_quant_config.json") or {}).get("quantization"))]
    sources = [s for s in sources if s[2] is not None]
    if not sources:
        raise CheckpointError(
            f"{path}: no quantization config (config.json 'quantization_config' or "
            "hf_quant_config.json 'quantization'); not a ModelOpt NVFP4 checkpoint")
    for file, key, q in sources:
        algo = q.get("quant_algo")
        if algo == "MIXED_PRECISION":
            table = q.get("quantized_layers")
            if not isinstance(table, dict) or not table:
                raise CheckpointError(
                    f"{file}: {key}.quant_algo is 'MIXED_PRECISION' but {key}.quantized_layers "
                    "(the per-module table) is missing or empty")
        elif algo != "NVFP4":
            raise CheckpointError(
                f"{file}: {key}.quant_algo is {algo!r}; only 'NVFP4' (or 'MIXED_PRECISION' "
                "with NVFP4 experts) is supported")
        elif q.get("group_size", BLOCK) != BLOCK:
            raise CheckpointError(
                f"{file}: {key}.group_size is {q['group_size']!r}; NVFP4 uses {BLOCK}")
        if "quant_method" in q and q["quant_method"] != "modelopt":
            raise CheckpointError(
                f"{file}: {key}.quant_method is {q['quant_method']!r}; expected 'modelopt'")
    # config.json's table is preferred (as vLLM); the legacy hf_quant_config.json's otherwise
    with_table = [s for s in sources if s[2].get("quantized_layers")]
    file, _, q = (with_table or sources)[0]
    return q, file


def _lookup(table: dict, module: str):
    """``(key, entry)`` of ``module`` in a ``quantized_layers`` table: the module, else its
    closest listed parent, else a wildcard key (``fnmatch``); ``(None, None)`` if absent."""
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        key = ".".join(parts[:k])
        for cand in (key, key.replace("model.language_model.", "language_model.model.", 1)):
            if cand in table:
                return cand, table[cand]
    for key, entry in table.items():
        if any(c in key for c in "*?[") and fnmatch.fnmatchcase(module, key):
            return key, entry
    return None, None


def _text_config(config: dict) -> dict:
    text = config.get("text_config")
    return text if isinstance(text, dict) else {}


def _model_type(config: dict) -> str | None:
    t = config.get("model_type")
    return t if isinstance(t, str) else _text_config(config).get("model_type")


def _config_count(config: dict) -> tuple[str | None, int | None]:
    """``(field, E)``: the routed expert count config.json states (None if it does not)."""
    for where, c in (("", config), ("text_config.", _text_config(config))):
        for field in EXPERT_COUNT_FIELDS:
            v = c.get(field)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return where + field, v
    return None, None


def _non_gated(config: dict) -> bool:
    """The config says non-gated experts (Nemotron-H: ReLU^2, up_proj and down_proj)."""
    acts = {str(c.get("mlp_hidden_act", "")).lower() for c in (config, _text_config(config))}
    return _model_type(config) == "nemotron_h" or bool(acts & {"relu2", "relu_squared"})


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def open_checkpoint(path) -> Checkpoint:
    """Open and validate the checkpoint directory ``path`` (headers only; no tensor data read).

    Raises
    ------
    CheckpointError
        (a ``ValueError``) naming the file and tensor: no index, a missing or
        truncated shard, a tensor missing from an expert, shapes or dtypes that
        differ across experts, an unsupported quantization, ``H % 128 != 0``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    index = path / INDEX
    if index.exists():
        data = _read_json(index)
        if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        weight_map = data["weight_map"]
    elif (path / SINGLE).exists():
        index = path / SINGLE
        weight_map = dict.fromkeys(_Shard(index).header, SINGLE)
    else:
        raise CheckpointError(f"{path}: neither {INDEX} nor {SINGLE} found")
    return Checkpoint(path, weight_map, index)
