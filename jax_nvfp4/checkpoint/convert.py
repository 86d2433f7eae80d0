"""``python -m jax_nvfp4 convert SRC DST``: a prepared checkpoint, one decoder layer at a time.

Each decoder layer becomes one output shard: its MoE layers read and put into
the kernel's layout on the host by the loader's machinery (else prepared on the
default device: ``layout_on_host``), its other tensors copied unchanged.
While a shard is written the next one's tensors are read and laid out
(:class:`ReadAhead`), so the host holds one layer's output and the next
layer's at a time. Every layer's scale values are checked before
anything is written.

Guarantees (see README, "Checkpoints"):

- DST appears only complete: everything is written into ``.DST.partial`` beside
  DST, renamed to DST at the end. A killed or failed run leaves no DST.
- Resumable: each shard is written as ``NAME.incomplete``, fsynced, renamed, and
  its size and sha256 recorded in the partial directory's manifest (replaced
  atomically after each shard). A rerun for the same source and options keeps
  the shards that still verify and converts the rest; a partial directory made
  for another source, options or version is removed.
- One conversion per DST: ``.DST.lock`` beside DST is held with ``flock`` (the
  kernel drops it when its holder dies, SIGKILL included) and records pid, host
  and start time, named in the refusal a second run gets.
- ``overwrite`` replaces only a directory written by convert (its
  ``jax_nvfp4.json`` of our format).
- Every I/O failure raises :class:`ConvertError` (exit 2) naming the file; the
  partial directory is kept for resuming.
- Deterministic bytes: tensors sorted by (dtype, name) as safetensors orders them,
  metadata keys sorted, JSON written with sorted keys; no timestamps.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError

from ..version import __version__
from .read import FORMAT, INDEX, LAYOUT, PREPARED_JSON, SINGLE, open_checkpoint
from ..errors import Interrupted, UserError
from .fslock import FileLock, LockHeld, describe
from .load import ReadAhead, host_layer, layout_on_host, read_layer, read_tensors

MANIFEST = ".jax_nvfp4-convert.json"  # in the partial directory; removed before the rename
# Test hook (tests/test_convert_faults.py), comma-separated: "kill@shard:K", "term@shard:K",
# "pause@shard:K" (after shard K is recorded; pause writes the pid to the file named by
# JAX_NVFP4_CONVERT_FAULT_FILE and sleeps), "kill@write:K" (halfway through writing
# shard K), "kill@final" (all written, before the rename), "slow:S" (sleep S seconds
# halfway through writing each shard).
_FAULT = "JAX_NVFP4_CONVERT_FAULT"
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # handled by run()
_deferred: list | None = None  # while committing: the signals that came, raised after
_CHUNK = 64 << 20


class ConvertError(UserError):
    """convert failed on an I/O error or was refused; the message says what to do."""


def configure(p):
    p.add_argument("src", metavar="SRC", help="ModelOpt NVFP4 checkpoint directory")
    p.add_argument("dst", metavar="DST", help="directory to write the prepared checkpoint to")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a checkpoint written by convert")
    p.add_argument("--quiet", action="store_true", help="no progress bar or resume messages")


def partial_dir(dst) -> Path:
    """Where a conversion into ``dst`` writes before the final rename: ``.DST.partial``."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.partial"


def lock_file(dst) -> Path:
    """The lock file of conversions into ``dst``: ``.DST.lock``."""
    dst = Path(dst)
    return dst.parent / f".{dst.name}.lock"


def _old_dir(dst: Path) -> Path:
    """Where ``--overwrite`` moves the previous DST just before the rename."""
    return dst.parent / f".{dst.name}.old"


def _check_dst(dst: Path, overwrite: bool):
    if not (dst.exists() or dst.is_symlink()):
        return
    if not overwrite:
        raise UserError(f"{dst} exists; pass --overwrite to replace it")
    info = None
    if dst.is_dir() and not dst.is_symlink():
        try:
            info = json.loads((dst / PREPARED_JSON).read_text())
        except (OSError, ValueError):
            info = None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(
            f"{dst} was not written by `python -m jax_nvfp4 convert` (no {PREPARED_JSON} of "
            f"format {FORMAT!r}); --overwrite replaces only such directories: remove it "
            "yourself or choose another DST")


def _replace(tmp: Path, dst: Path):
    """Rename ``tmp`` to ``dst``; an existing ``dst`` is moved aside first, then removed."""
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return
    old = _old_dir(dst)
    if old.exists():
        shutil.rmtree(old)
    os.rename(dst, old)
    os.rename(tmp, dst)
    shutil.rmtree(old)


class _Where:
    """What convert is doing, for the message of an I/O error that names no file."""

    def __init__(self):
        self.verb, self.path = "preparing", None

    def __call__(self, verb, path):
        self.verb, self.path = verb, path


def convert(src, dst, *, overwrite: bool = False, progress: bool = True, log=None) -> dict:
    """Convert checkpoint ``src`` to a prepared checkpoint at ``dst``; returns a summary dict.

    The output holds, per MoE layer ``prefix`` (e.g. ``model.layers.3.mlp.experts``),
    ``{prefix}.w13_weight``, ``.w13_weight_scale``, ``.w2_weight``, ``.w2_weight_scale``
    (exactly :func:`prepare_layer`'s outputs), float32 ``.w13_weight_scale_2`` and
    ``.w13_input_scale`` ``[E, 2]`` (gate, up), ``.w2_weight_scale_2`` and
    ``.w2_input_scale`` ``[E]``; other tensors unchanged; the index rewritten; the
    other files of ``src`` copied; and ``jax_nvfp4.json`` recording the layout.

    Resumes an interrupted conversion into the same ``dst`` (see the module docstring).
    ``log(message)`` gets what is reused or removed (default: stderr when ``progress``).

    Raises
    ------
    ConvertError
        (a :class:`UserError`) on any I/O error, naming the file, with the partial
        directory kept for a rerun to resume; when another conversion holds ``dst``.
    UserError
        ``dst`` exists (without ``overwrite``), is not a conversion (with it), or
        overlaps ``src``; ``src`` is already prepared.
    """
    from tqdm import tqdm  # noqa: PLC0415  (only the CLI needs it)

    if log is None:
        def log(msg):
            if progress:
                print(msg, file=sys.stderr)
    src, dst = Path(src), Path(dst)
    dst = dst.parent.resolve() / dst.name  # one lock and partial per directory
    if src.resolve() == dst.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"{dst} would overwrite or sit inside the source {src}")
    if dst.resolve() in src.resolve().parents:  # replacing DST would delete SRC
        raise UserError(f"the source {src} sits inside {dst}; choose another destination")
    _check_dst(dst, overwrite)
    if not (up := next(d for d in (dst.parent, *dst.parent.parents) if d.exists())).is_dir():
        raise ConvertError(f"cannot write {dst}: {up} is not a directory")
    start = time.perf_counter()
    with open_checkpoint(src) as ckpt:
        if ckpt.prepared:
            raise UserError(f"{src} is already prepared (see its {PREPARED_JSON})")
        groups = ckpt.groups()
        for layer in ckpt.moe:  # every scale value checked (cached) before anything is written
            ckpt.scales(layer)
        total = sum(ckpt.nbytes(n) for n in ckpt.weight_map)
        metadata = {"jax_nvfp4.format": FORMAT, "jax_nvfp4.layout": LAYOUT,
                    "jax_nvfp4.version": __version__, "jax_nvfp4.source": str(src.resolve())}
        files = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
                 for k in range(len(groups))]
        key = _fingerprint(src, metadata, [(f, [x.prefix for x in moe], sorted(names))
                                           for f, (_, moe, names) in zip(files, groups)])
        tmp, where = partial_dir(dst), _Where()
        try:
            where("creating", dst.parent)
            dst.parent.mkdir(parents=True, exist_ok=True)
            where("locking", lock_file(dst))
            lock = FileLock(lock_file(dst)).acquire()
        except LockHeld as e:
            raise ConvertError(
                f"{dst} is being written by another conversion: {describe(e.holder)} "
                f"(lock {e.path}); wait for it to finish or stop it") from None
        except OSError as e:
            raise ConvertError(_io_message(e, where)) from None
        manifest, reads, ahead = None, [0], ReadAhead()
        on_host = layout_on_host(None)  # the layers read ahead laid out (or not) for it
        try:
            _check_dst(dst, overwrite)  # again, now that no other conversion can write it
            manifest, done = _resume(tmp, dst, key, lock.previous, log, where)
            weight_map, written = {}, 0

            def tick(n):
                reads[0] += n
                bar.update(n)

            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc="convert", disable=not progress) as bar:
                for k, (file, (_, moe, names)) in enumerate(zip(files, groups)):
                    if (rec := done.get(file)) is None:
                        before = reads[0]
                        where("reading", ckpt.path)
                        if (ready := ahead.take(file)) is not None:
                            tensors = ready.result()
                            tick(sum(x.nbytes for x in tensors.values()))
                        else:
                            tensors = read_tensors(ckpt, names, progress=tick)
                        for layer in moe:
                            where("reading", ckpt.path)
                            arrays = host_layer(ckpt, layer, progress=tick,
                                                host=ahead.take(layer.prefix))
                            tensors.update((f"{layer.prefix}.{n}", x) for n, x in arrays.items())
                            del arrays
                        # the next shard's tensors are read while this one is written
                        if (nxt := next(((f, g) for f, g in zip(files[k + 1:], groups[k + 1:])
                                         if f not in done), None)) is not None:
                            ahead.start(nxt[0], read_tensors, ckpt, nxt[1][2])
                            for later in nxt[1][1]:
                                ahead.start(later.prefix, read_layer, ckpt, later,
                                            prepare=on_host, padded=not on_host)
                        rec = _write_shard(tensors, tmp / file, metadata, k + 1, where)
                        rec.update(tensors=sorted(tensors), read=reads[0] - before,
                                   nbytes=sum(x.nbytes for x in tensors.values()))
                        del tensors
                        manifest["shards"][file] = rec
                        _write_json(tmp / MANIFEST, manifest, where)
                        _fault("shard", k + 1)
                    else:
                        bar.update(rec["read"])
                    weight_map.update(dict.fromkeys(rec["tensors"], file))
                    written += rec["nbytes"]
            _write_json(tmp / INDEX, {"metadata": {"total_size": written},
                                      "weight_map": dict(sorted(weight_map.items()))}, where)
            layers = {x.prefix: {"experts": x.spec.experts, "hidden": x.hidden,
                                 "intermediate": x.intermediate,
                                 "padded_hidden": x.padded_hidden,
                                 "padded_intermediate": x.padded_intermediate} for x in ckpt.moe}
            _write_json(tmp / PREPARED_JSON,
                        {"format": FORMAT, "layout": LAYOUT, "jax_nvfp4_version": __version__,
                         "source": str(src.resolve()), "naming": ckpt.naming,
                         "gated": all(x.gated for x in ckpt.moe),
                         "moe_layers": layers}, where)
            for f in sorted(src.iterdir()):  # config, tokenizer, ... (the shards were rewritten)
                if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, SINGLE):
                    where("copying", f"{f} to {tmp / f.name}")
                    shutil.copy2(f, tmp / f.name)
                    _fsync(tmp / f.name)
            _fault("final")
            where("finishing", tmp)
            _check_dst(dst, overwrite)
            with _deferred_signals():  # the commit: dropping the manifest, the rename
                (tmp / MANIFEST).unlink()
                _fault("commit")
                _fsync(tmp)
                where("renaming", f"{tmp} to {dst}")
                _replace(tmp, dst)
                _fsync(dst.parent)
        except (OSError, SafetensorError) as e:
            raise ConvertError(_io_message(e, where) + _kept(tmp, manifest, len(files))) from e
        except BaseException:
            if manifest is not None and tmp.exists():
                print(f"convert: {_kept(tmp, manifest, len(files))[2:]}", file=sys.stderr)
            raise
        finally:
            ahead.close()
            lock.release()
    stats = jax.devices()[0].memory_stats() or {}
    return {"src": src, "dst": dst, "naming": ckpt.naming, "moe_layers": len(ckpt.moe),
            "experts": sum(x.spec.experts for x in ckpt.moe), "shards": len(groups),
            "reused_shards": len(done), "bytes_read": reads[0], "bytes_written": written,
            "seconds": time.perf_counter() - start,
            "peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_device_bytes": stats.get("peak_bytes_in_use")}


def _io_message(e: BaseException, where: _Where) -> str:
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        path = e.filename if e.filename is not None else where.path
        path = f"{path} to {e.filename2}" if e.filename2 is not None else path
    else:  # SafetensorError: a message, no errno
        what, path = str(e), where.path
    return f"{what} ({where.verb} {path})"


def _kept(tmp: Path, manifest, n: int) -> str:
    if manifest is None or not tmp.exists():
        return ""
    k = len(manifest["shards"])
    try:
        size = f", {_mib(sum(f.stat().st_size for f in tmp.iterdir()))}"
    except OSError:
        size = ""
    return (f"; the partial output {tmp} is kept ({k} of {n} shards done and verified{size}): "
            "run the same command again to resume, or remove it")


def _fingerprint(src: Path, metadata: dict, plan: list) -> str:
    """What decides the output bytes: the source files (name, size, mtime), options, code."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                   for f in src.iterdir() if f.is_file())
    blob = json.dumps({"source": str(src.resolve()), "files": files, "metadata": metadata,
                       "plan": plan, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _resume(tmp: Path, dst: Path, key: str, previous: dict, log, where) -> tuple[dict, dict]:
    """The manifest to continue, and its shards that verify; anything else in ``tmp`` goes."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    fresh = {"key": key, "run": me, "shards": {}}
    for junk in sorted(dst.parent.glob(f".{glob.escape(dst.name)}.*.partial")):
        log(f"note: {junk} was left by an older version of convert (it cannot be resumed); "
            "remove it if no conversion of that version is running")
    old_dst = _old_dir(dst)
    if old_dst.exists():  # a replaced conversion a killed --overwrite had moved aside
        log(f"removing {old_dst}, left by an interrupted --overwrite")
        where("removing", old_dst)
        shutil.rmtree(old_dst)
    where("reading", tmp / MANIFEST)
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    if not tmp.exists():
        tmp.mkdir()
        _write_json(tmp / MANIFEST, fresh, where)
        return fresh, {}
    try:
        old = json.loads((tmp / MANIFEST).read_text())
    except (OSError, ValueError):
        old = None
    if not (isinstance(old, dict) and isinstance(old.get("shards"), dict)):
        old = None
    who = describe(old.get("run", {}) if old else previous)
    if old is None or old.get("key") != key:
        why = "another source, options or version" if old else "no readable manifest"
        log(f"removing {tmp}, left by an interrupted run ({who}; {why})")
        where("removing", tmp)
        shutil.rmtree(tmp)
        tmp.mkdir()
        _write_json(tmp / MANIFEST, fresh, where)
        return fresh, {}
    done = {}
    for file, rec in sorted(old["shards"].items()):
        p = tmp / file
        where("verifying", p)
        if not p.is_file():
            log(f"  {file}: missing, converting it again")
        elif p.stat().st_size != rec.get("size") or _sha256(p) != rec.get("sha256"):
            log(f"  {file}: size or checksum differs from the manifest, converting it again")
        else:
            done[file] = rec
    log(f"resuming the conversion in {tmp} ({who}): reusing {len(done)} verified shard(s)"
        + "".join(f"\n  reusing {f} ({done[f]['size']:,} bytes, sha256 {done[f]['sha256'][:12]})"
                  for f in sorted(done)))
    for p in sorted(tmp.iterdir()):  # half-written shards, copies, index: written again
        if p.name not in done and p.name != MANIFEST:
            where("removing", p)
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    manifest = {"key": key, "run": me, "shards": dict(done)}
    _write_json(tmp / MANIFEST, manifest, where)
    return manifest, done


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict, where):
    """Write ``path`` atomically (a temporary, fsynced, renamed over it)."""
    part = path.with_name(path.name + ".incomplete")
    where("writing", part)
    with open(part, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(part, 0o666 & ~_umask())
    where("renaming", f"{part} to {path}")
    os.replace(part, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# safetensors' dtype codes, in the order of its Rust enum; it lays out tensors by
# descending dtype, then by name, which _header reproduces.
_CODES = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
          "U32", "F32", "F64", "I64", "U64")
_NUMPY = {np.dtype(t): c for t, c in [
    (np.bool_, "BOOL"), (np.uint8, "U8"), (np.int8, "I8"), (ml_dtypes.float8_e5m2, "F8_E5M2"),
    (ml_dtypes.float8_e4m3fn, "F8_E4M3"), (np.int16, "I16"), (np.uint16, "U16"),
    (np.float16, "F16"), (ml_dtypes.bfloat16, "BF16"), (np.int32, "I32"), (np.uint32, "U32"),
    (np.float32, "F32"), (np.float64, "F64"), (np.int64, "I64"), (np.uint64, "U64")]}


def _header(tensors: dict, metadata: dict | None) -> tuple[bytes, list[str]]:
    """The safetensors header (length, JSON padded to 8 bytes) and the data order."""
    code = {}
    for n, x in tensors.items():
        dt = np.dtype(x.dtype)
        if dt.newbyteorder("=") not in _NUMPY or dt.byteorder == ">":
            raise TypeError(f"tensor {n!r}: dtype {dt} cannot be written to safetensors")
        code[n] = _NUMPY[dt]
    order = sorted(tensors, key=lambda n: (-_CODES.index(code[n]), n))
    head, offset = {}, 0
    if metadata:
        head["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    for n in order:
        size = tensors[n].nbytes
        head[n] = {"dtype": code[n], "shape": list(tensors[n].shape),
                   "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_safetensors(tensors: dict, path, metadata: dict | None = None) -> dict:
    """Write ``tensors`` as a safetensors file, deterministically; returns size and sha256.

    The bytes are those of ``safetensors.numpy.save_file`` except that metadata keys
    are sorted (safetensors writes them in hash order, which changes every run).
    """
    return _write_shard(tensors, Path(path), metadata, None, _Where())


def _write_shard(tensors: dict, path: Path, metadata, k, where) -> dict:
    """``path`` written as ``NAME.incomplete``, fsynced, renamed; ``{"size", "sha256"}``."""
    tensors = {n: np.asarray(x, order="C") for n, x in tensors.items()}  # 0-d stays 0-d
    header, order = _header(tensors, metadata)
    part = path.with_name(path.name + ".incomplete")
    h, size = hashlib.sha256(header), len(header)
    hashed = None  # the block being hashed on the hasher thread while the next is written
    where("writing", part)
    try:
        with open(part, "wb") as f:
            f.write(header)
            for i, n in enumerate(order):
                data = tensors[n].reshape(-1).view(np.uint8)
                for s in range(0, data.size, _CHUNK):
                    block = data[s:s + _CHUNK].data
                    f.write(block)
                    if hashed is not None:
                        hashed.result()  # in order: one update at a time
                    hashed = _hasher().submit(h.update, block)
                size += data.size
                if i == len(order) // 2 and k is not None:
                    _fault("write", k)
            f.flush()
            os.fsync(f.fileno())
        if hashed is not None:
            hashed.result()
    except BaseException:
        if hashed is not None:
            concurrent.futures.wait([hashed])
        part.unlink(missing_ok=True)  # half a shard is of no use; free its space (disk full)
        raise
    os.chmod(part, 0o666 & ~_umask())  # like the copied files
    where("renaming", f"{part} to {path}")
    os.replace(part, path)
    return {"size": size, "sha256": h.hexdigest()}


_hash_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _forget_hasher():  # a forked child has the pool object but not its thread
    global _hash_pool
    _hash_pool = None


os.register_at_fork(after_in_child=_forget_hasher)


def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    """One thread hashing written blocks (hashlib drops the GIL), overlapping the writes."""
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = concurrent.futures.ThreadPoolExecutor(1, "jax_nvfp4-sha256")
    return _hash_pool


def _fault(point: str, k: int | None = None):
    """The test hook (see ``_FAULT``); nothing unless the variable is set."""
    spec = os.environ.get(_FAULT)
    if not spec:
        return
    here = point if k is None else f"{point}:{k}"
    for item in spec.split(","):
        action, _, at = item.partition("@")
        if action.startswith("slow:") and point == "write":
            time.sleep(float(action[5:]))
        elif at == here and action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif at == here and action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread
        elif at == here and action == "pause":
            Path(os.environ["JAX_NVFP4_CONVERT_FAULT_FILE"]).write_text(str(os.getpid()))
            while True:
                time.sleep(1)


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _on_signal(signum, frame):
    if _deferred is not None:
        _deferred.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def _deferred_signals():
    """Signals handled by ``_on_signal`` wait until the block is done (then raise)."""
    global _deferred
    _deferred = []
    try:
        yield
    finally:
        came, _deferred = _deferred, None
    if came:
        raise Interrupted(came[0])


def run(args) -> int:
    # SIGTERM and SIGHUP end the run like Ctrl-C: the lock released, the partial kept;
    # none of them can cut the final rename in two (see _deferred_signals).
    old = {s: signal.signal(s, _on_signal) for s in _SIGNALS}
    try:
        s = convert(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    t = s["seconds"]
    print(f"converted {s['src']} -> {s['dst']} ({s['naming']} naming)")
    print(f"  MoE layers: {s['moe_layers']}, experts: {s['experts']}, shards: {s['shards']}"
          + (f" ({s['reused_shards']} reused from an interrupted run)"
             if s["reused_shards"] else ""))
    print(f"  bytes: {_mib(s['bytes_read'])} read, {_mib(s['bytes_written'])} written "
          f"in {t:.2f} s ({s['bytes_read'] / max(t, 1e-9) / 2**20:,.1f} MiB/s)")
    print(f"  peak memory: host {_mib(s['peak_host_bytes'])} (RSS), "
          f"device {_mib(s['peak_device_bytes'])}")
    return 0
