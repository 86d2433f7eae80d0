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

from ._scales import KERNEL_NAMES, kernel_scales
from ._spec import BLOCK, NAMES, LayerSpec, check_arrays

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PREPARED_JSON = "jax_nvfp4.json"  # written next to the shards of a prepared checkpoint
FORMAT = "jax_nvfp4.prepared"
LAYOUT = "trtllm_fp4_block_scale_moe"
SCALE_NAMES = ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale")

# naming -> projection names of (gate, up, down)
NAMINGS = {"qwen3": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
FIELDS = ("weight", "weight_scale", "weight_scale_2", "input_scale")
_EXPERT = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)"
    r"\.(?P<field>weight|weight_scale|weight_scale_2|input_scale)$"
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
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
        """Tensor ``name`` (or its slice ``[index]`` along axis 0) as a new numpy array."""
        dtype, shape = self.info(name)
        if dtype not in _BYTES_DTYPES:
            return self._f.get_tensor(name) if index is None else self._f.get_slice(name)[index]
        begin, end = self.header[name]["data_offsets"]
        if index is not None:
            per = int(np.prod(shape[1:]))
            begin, end, shape = begin + index * per, begin + (index + 1) * per, shape[1:]
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
            per = (end - begin) // shape[0]
            begin, end = begin + index * per, begin + (index + 1) * per
        return self._start + begin, end - begin

    def pread(self, offset: int, out) -> None:
        """Fill the contiguous buffer ``out`` with the file's bytes from ``offset``.

        Thread-safe (``os.preadv`` on one descriptor, no shared position) and without
        the GIL while the kernel copies, so several threads read in parallel.
        """
        view = memoryview(out).cast("B")
        fd, done = self._descriptor(), 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:  # name the shard (preadv's error names no file)
                e.filename = str(self.path)
                raise
            if n <= 0:
                raise CheckpointError(f"{self.path}: cut short at byte {offset + done} "
                                      f"(reading {len(view)} bytes at {offset}); truncated?")
            done += n

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
    checkpoint, ``H`` and ``I`` already padded); ``hidden`` and ``intermediate`` are the
    model's valid ``H`` and ``I``. ``naming`` is None for a prepared layer, whose stacked
    tensors are ``{prefix}.{name}``. ``kernel_stored``: a prepared layer holds the
    kernel's scalars (converted checkpoints written before them do not).
    """

    prefix: str
    layer: int | None
    spec: LayerSpec
    intermediate: int
    naming: str | None
    hidden: int
    kernel_stored: bool = False

    @property
    def prepared(self) -> bool:
        return self.naming is None

    @property
    def padded_hidden(self) -> int:
        """``H`` in the kernel's layout (stored, or as loading pads it)."""
        return self.spec.hidden if self.prepared else self.spec.padded_h

    @property
    def padded_intermediate(self) -> int:
        """``I`` in the kernel's layout (stored, or as loading pads it)."""
        return self.spec.intermediate if self.prepared else self.spec.padded_i

    def expert(self, e: int, proj: str, field: str) -> str:
        """Source tensor name of expert ``e``; ``proj`` is "gate", "up" or "down"."""
        gate, up, down = NAMINGS[self.naming]
        return f"{self.prefix}.{e}.{dict(gate=gate, up=up, down=down)[proj]}.{field}"

    def parts(self, array: str, e: int) -> list[tuple[str, int | None, int]]:
        """Pieces of expert ``e`` of stacked ``array``: ``(tensor, index or None, first row)``."""
        if self.prepared:
            return [(f"{self.prefix}.{array}", e, 0)]
        field = "weight_scale" if array.endswith("scale") else "weight"
        if array.startswith("w2"):
            return [(self.expert(e, "down", field), None, 0)]
        # w13 rows are [up; gate], as the kernel wants.
        return [(self.expert(e, "up", field), None, 0),
                (self.expert(e, "gate", field), None, self.intermediate)]


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
        self.quant = _check_quant(path)
        self.naming: str | None = None
        self.moe: list[MoELayer] = (self._prepared_layers() if self.prepared
                                    else self._source_layers())
        if self.prepared:
            taken = {f"{x.prefix}.{n}" for x in self.moe
                     for n in NAMES + SCALE_NAMES + KERNEL_NAMES}
        else:
            taken = {n for n in weight_map if _EXPERT.match(n)}
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
        e_ = range(layer.spec.experts)

        def get(proj, field):
            names = [layer.expert(e, proj, field) for e in e_]
            out = np.array([self.read(n).reshape(()) for n in names], np.float32)
            if not (np.isfinite(out) & (out > 0)).all():
                bad = int(np.argmin(np.isfinite(out) & (out > 0)))
                self._check_values(names[bad], out[bad])
            return out
        return {
            "w13_weight_scale_2": np.stack([get("gate", "weight_scale_2"),
                                            get("up", "weight_scale_2")], axis=1),
            "w13_input_scale": np.stack([get("gate", "input_scale"),
                                         get("up", "input_scale")], axis=1),
            "w2_weight_scale_2": get("down", "weight_scale_2"),
            "w2_input_scale": get("down", "input_scale"),
        }

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
            return {n: np.asarray(x) for n, x in kernel_scales(**scales).items()}

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

    def _expect(self, name: str, dtype: str, shape: tuple[int, ...], how: str = ""):
        got_dtype, got_shape = self.info(name)
        if got_dtype != dtype:
            self._fail(name, f"expected dtype {dtype}, got {got_dtype}")
        if shape == () and int(np.prod(got_shape)) == 1:  # scalars: [] or [1]
            return
        if got_shape != shape:
            self._fail(name, f"expected shape {list(shape)}{how}, got {list(got_shape)}")

    def _source_layers(self) -> list[MoELayer]:
        found: dict[str, set[int]] = {}
        projs = set()
        for name in self.weight_map:
            if m := _EXPERT.match(name):
                found.setdefault(m["prefix"], set()).add(int(m["e"]))
                projs.add(m["proj"])
        if not found:
            raise CheckpointError(
                f"{self.path}: no NVFP4 MoE experts found (no tensor named "
                "'<...>.experts.<e>.{gate_proj,up_proj,down_proj|w1,w3,w2}.weight')")
        namings = [k for k, v in NAMINGS.items() if projs & set(v)]
        if len(namings) != 1:
            raise CheckpointError(
                f"{self.index_file}: expert projections {sorted(projs)} mix the namings "
                f"{namings}; expected one of {NAMINGS}")
        self.naming = namings[0]
        return [self._source_layer(prefix, experts) for prefix, experts in found.items()]

    def _source_layer(self, prefix: str, experts: set[int]) -> MoELayer:
        e_count = max(experts) + 1
        probe = MoELayer(prefix, layer_index(prefix + "."), LayerSpec(e_count, 0, 0, True), 0,
                         self.naming, hidden=0)
        for e in range(e_count):
            for proj in ("gate", "up", "down"):
                for field in FIELDS:
                    name = probe.expert(e, proj, field)
                    if name not in self.weight_map:
                        raise CheckpointError(
                            f"{self.index_file}: tensor {name!r} is missing (expert {e} of "
                            f"{prefix}, which has {e_count} experts)")
        first = probe.expert(0, "gate", "weight")
        dtype, shape = self.info(first)
        if dtype != "U8" or len(shape) != 2:
            self._fail(first, f"expected U8 [I, H/2] (packed e2m1), got {dtype} {list(shape)}")
        i, h = shape[0], 2 * shape[1]
        if h % BLOCK:
            self._fail(first, f"hidden size H = 2 x shape[1] = {h} must be a multiple of "
                              f"{BLOCK} (one scale per {BLOCK} values; loading pads it to the "
                              "kernel's alignment)")
        if i % BLOCK:
            self._fail(first, f"intermediate size I = shape[0] = {i} must be a multiple of "
                              f"{BLOCK} (one scale per {BLOCK} values)")
        want = {("gate", "weight"): (i, h // 2), ("gate", "weight_scale"): (i, h // BLOCK),
                ("down", "weight"): (h, i // 2), ("down", "weight_scale"): (h, i // BLOCK)}
        how = f" (as expert 0 of {prefix}: H={h}, I={i})"
        for e in range(e_count):
            for proj in ("gate", "up", "down"):
                for field in FIELDS:
                    shape = want.get(("down" if proj == "down" else "gate", field), ())
                    self._expect(probe.expert(e, proj, field), _DT.get(field, "F32"), shape, how)
        layer = dataclasses.replace(probe, spec=LayerSpec(e_count, h, i, True), intermediate=i,
                                    hidden=h)
        _check_spec(layer, self.path)
        return layer

    def _prepared_layers(self) -> list[MoELayer]:
        out = []
        layers = self.prepared_info.get("moe_layers", {})
        if not isinstance(layers, dict):
            raise CheckpointError(f"{self.path / PREPARED_JSON}: 'moe_layers' is not a mapping")
        for prefix, d in layers.items():
            e, h, i, hp, ip = self._sizes(prefix, d)
            # the stored sizes, padded H and I: spec.shapes(padded=False) are the stored shapes
            spec = LayerSpec(e, hp, ip, True)
            present = [f"{prefix}.{n}" in self.weight_map for n in KERNEL_NAMES]
            if any(present) and not all(present):  # none: converted before they were stored
                self._need(f"{prefix}.{KERNEL_NAMES[present.index(False)]}")
            layer = MoELayer(prefix, layer_index(prefix + "."), spec, i, None, hidden=h,
                             kernel_stored=all(present))
            for name, shape in zip(NAMES, spec.shapes(padded=False)):
                self._need(f"{prefix}.{name}")
                self._expect(f"{prefix}.{name}", _DT[name], shape)
            for name in SCALE_NAMES:
                self._need(f"{prefix}.{name}")
                self._expect(f"{prefix}.{name}", "F32", (e, 2) if name.startswith("w13") else (e,))
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
    check_arrays(arrays, gated=True, prepared=layer.prepared, where=f"{path}: {layer.prefix}.")


def _read_json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _check_quant(path: Path) -> dict:
    """The quantization config; refuses anything but ModelOpt NVFP4 with 16-value blocks."""
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
        if q.get("quant_algo") != "NVFP4":
            raise CheckpointError(
                f"{file}: {key}.quant_algo is {q.get('quant_algo')!r}; only 'NVFP4' is supported")
        if q.get("group_size", BLOCK) != BLOCK:
            raise CheckpointError(
                f"{file}: {key}.group_size is {q['group_size']!r}; NVFP4 uses {BLOCK}")
        if "quant_method" in q and q["quant_method"] != "modelopt":
            raise CheckpointError(
                f"{file}: {key}.quant_method is {q['quant_method']!r}; expected 'modelopt'")
    return sources[0][2]


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
