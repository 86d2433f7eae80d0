"""convert under faults: SIGKILL at fixed and random points, SIGTERM, a full disk, I/O errors,
concurrent runs, stale partial directories, the lock without flock.

Every case checks the same things: the source is untouched, DST is absent or complete and
bit-exact (against an uninterrupted conversion), and a rerun completes bit-exact, reusing
the shards the manifest recorded. Kills at known points use convert's test hook
(``JAX_NVFP4_CONVERT_FAULT``, see ``_convert._FAULT``), so they land where they should on
a loaded machine; the random-delay variant slows each shard's write to spread the run out.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors import SafetensorError

from jax_nvfp4 import cli as _cli
from jax_nvfp4.checkpoint import convert as _convert, fslock as _fslock
from jax_nvfp4.errors import UserError
from jax_nvfp4.testing import write_checkpoint

SHARDS = 4  # the non-layer tensors + 3 decoder layers


def _tree(path: Path) -> dict:
    """relative file name -> sha256, for every file under ``path``."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(Path(path).rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(source, its file hashes, hashes of its uninterrupted conversion)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    root = tmp_path_factory.mktemp("faults")
    src = root / "src"
    write_checkpoint(src, layers=3, experts=2, seed=seed)
    _convert.convert(src, root / "ref", progress=False)
    ref = _tree(root / "ref")
    assert sum(f.endswith(".safetensors") for f in ref) == SHARDS
    return src, _tree(src), ref


def _spawn(src, dst, fault, **env):
    env = {**os.environ, "JAX_NVFP4_CONVERT_FAULT": fault, **env}
    return subprocess.Popen([sys.executable, "-m", "jax_nvfp4", "convert", "--quiet",
                             str(src), str(dst)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _manifest(dst: Path) -> dict:
    return json.loads((_convert.partial_dir(dst) / _convert.MANIFEST).read_text())


def _interrupt_at(point, k=None):
    """A stand-in for convert's fault hook: Ctrl-C at one point."""
    def fault(p, n=None):
        if (p, n) == (point, k):
            raise KeyboardInterrupt
    return fault


def _settle(ckpt, dst: Path, capsys=None, reused=None):
    """The invariants after a fault, then a rerun that must finish bit-exact."""
    src, src_tree, ref = ckpt
    assert _tree(src) == src_tree  # the source is never touched
    if dst.exists():  # complete or absent, never half
        assert _tree(dst) == ref
        assert not _convert.partial_dir(dst).exists()
        return
    with _fslock.FileLock(_convert.lock_file(dst)):  # nobody holds the lock
        pass
    summary = _convert.convert(src, dst, progress=False, log=print)
    if reused is not None:
        assert summary["reused_shards"] == reused
    if capsys is not None and summary["reused_shards"]:
        out = capsys.readouterr().out
        assert "resuming the conversion" in out and "reusing model-00001" in out, out
    assert _tree(dst) == ref
    assert _tree(src) == src_tree
    assert not [p.name for p in dst.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fault,recorded,incomplete", [
    ("kill@shard:2", 2, False),    # between shards
    ("kill@write:3", 2, True),     # halfway through a shard
    ("kill@final", SHARDS, False),  # everything written, not yet renamed
])
def test_sigkill_then_rerun_resumes(ckpt, tmp_path, capsys, fault, recorded, incomplete):
    dst = tmp_path / "dst"
    p = _spawn(ckpt[0], dst, fault)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err
    assert not dst.exists()
    partial = _convert.partial_dir(dst)
    assert sorted(_manifest(dst)["shards"]) == [
        f"model-{k:05d}-of-{SHARDS:05d}.safetensors" for k in range(1, recorded + 1)]
    assert any(f.name.endswith(".incomplete") for f in partial.iterdir()) == incomplete
    # the killed run's lock file is left, holding its pid, but the lock died with it
    assert json.loads(_convert.lock_file(dst).read_text())["pid"] == p.pid
    _settle(ckpt, dst, capsys, reused=recorded)


def test_sigkill_during_overwrite_keeps_the_old_conversion(ckpt, tmp_path, capsys):
    other, dst = tmp_path / "other", tmp_path / "dst"
    write_checkpoint(other, layers=1, experts=2, seed=3)
    _convert.convert(other, dst, progress=False)
    old = _tree(dst)
    p = subprocess.Popen([sys.executable, "-m", "jax_nvfp4", "convert", "--quiet", "--overwrite",
                          str(ckpt[0]), str(dst)], stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "JAX_NVFP4_CONVERT_FAULT": "kill@final"})
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err
    assert _tree(dst) == old  # replaced only by the final rename
    # killed between the two renames of the replacement: DST gone, the old one aside
    os.rename(dst, tmp_path / ".dst.old")
    (_convert.partial_dir(dst) / _convert.MANIFEST).unlink()
    _convert.convert(ckpt[0], dst, overwrite=True, progress=False, log=print)
    out = capsys.readouterr().out
    assert "left by an interrupted --overwrite" in out and "no readable manifest" in out, out
    assert _tree(dst) == ckpt[2] and _tree(ckpt[0]) == ckpt[1]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_exits_cleanly_and_keeps_partial(ckpt, tmp_path, capsys):
    dst = tmp_path / "dst"
    p = _spawn(ckpt[0], dst, "term@shard:1")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert "1 of 4 shards done" in err and "run the same command again" in err
    assert not dst.exists() and not _convert.lock_file(dst).exists()  # released on the way out
    # the rerun, through the CLI: it says what it reuses
    assert _cli.main(["convert", str(ckpt[0]), str(dst)]) == 0
    out = capsys.readouterr()
    assert "reusing model-00001-of-00004.safetensors" in out.err
    assert "(1 reused from an interrupted run)" in out.out
    _settle(ckpt, dst)


def test_signal_during_the_final_rename_waits_for_it(ckpt, tmp_path, monkeypatch):
    # SIGTERM just after the manifest is dropped: the rename still happens, then the run
    # ends as interrupted with a complete DST (not a partial without a manifest).
    def fault(p, n=None):
        if p == "commit":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # where the handler would raise

    monkeypatch.setattr(_convert, "_fault", fault)
    old = signal.signal(signal.SIGTERM, _convert._on_signal)
    try:
        dst = tmp_path / "dst"
        with pytest.raises(_cli.Interrupted):
            _convert.convert(ckpt[0], dst, progress=False)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert _tree(dst) == ckpt[2]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigkill_at_random_times(ckpt, tmp_path, rng):
    # Each shard's write sleeps 0.15 s halfway, so the run spans ~1.2 s after it takes the
    # lock; kills land before, between, inside shards and after the end.
    for i, delay in enumerate(rng.uniform(0, 1.5, size=3)):
        dst = tmp_path / f"run{i}" / "dst"
        p = _spawn(ckpt[0], dst, "slow:0.15")
        deadline = time.monotonic() + 120
        while (p.poll() is None and not _convert.lock_file(dst).exists()
               and time.monotonic() < deadline):
            time.sleep(0.01)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        partial = _convert.partial_dir(dst)
        shards = (len(_manifest(dst)["shards"]) if (partial / _convert.MANIFEST).exists()
                  else None)
        print(f"kill {delay:.2f} s after the lock: rc {p.returncode}, DST complete: "
              f"{dst.exists()}, partial: {partial.exists()} with {shards} shards recorded")
        _settle(ckpt, dst)


def test_concurrent_conversion_is_refused(ckpt, tmp_path, capsys):
    dst, flag = tmp_path / "dst", tmp_path / "paused"
    p = _spawn(ckpt[0], dst, "pause@shard:1", JAX_NVFP4_CONVERT_FAULT_FILE=str(flag))
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.02)
        holder = f"pid {p.pid} on host {socket.gethostname()} since 20"
        # a second run (same or another source) is refused, naming the holder, exit 2
        other = tmp_path / "other"
        write_checkpoint(other, layers=1, experts=2, seed=1)
        for src in (ckpt[0], other):
            assert _cli.main(["convert", "--quiet", str(src), str(dst)]) == 2
            err = capsys.readouterr().err
            assert "is being written by another conversion" in err and holder in err, err
        with pytest.raises(UserError, match="being written"):  # --overwrite changes nothing
            _convert.convert(ckpt[0], dst, overwrite=True, progress=False)
        assert len(_manifest(dst)["shards"]) == 1  # the holder's partial, untouched
    finally:
        p.kill()
        p.communicate(timeout=60)
    _settle(ckpt, dst, capsys, reused=1)


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_full_disk_is_exit_2_and_resumes_after_freeing_space(ckpt, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root and permission)")
    try:
        total = sum((ckpt[0].parent / "ref" / f).stat().st_size for f in ckpt[2])
        # room for about half the output: the third or fourth shard cannot be written
        subprocess.run(["mount", "-o", f"remount,size={total // 2 // 4096 * 4096}", str(disk)],
                       check=True)
        dst = disk / "dst"
        assert _cli.main(["convert", "--quiet", str(ckpt[0]), str(dst)]) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err, err
        assert f"writing {_convert.partial_dir(dst)}/" in err, err  # names the file
        assert "kept" in err and "run the same command again to resume" in err
        assert not dst.exists() and not _convert.lock_file(dst).exists()
        recorded = len(_manifest(dst)["shards"])
        assert 1 <= recorded < SHARDS
        subprocess.run(["mount", "-o", f"remount,size={4 * total}", str(disk)], check=True)
        _settle(ckpt, dst, capsys, reused=recorded)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("point,k,error", [
    ("write", 2, OSError(errno.ENOSPC, "No space left on device")),
    ("write", 3, OSError(errno.EIO, "Input/output error")),
    ("shard", 1, PermissionError(errno.EACCES, "Permission denied")),
    # what safetensors raises on a failed write (not an OSError)
    ("write", 2, SafetensorError("I/O error: No space left on device (os error 28)")),
])
def test_injected_io_errors_are_exit_2_and_resume(ckpt, tmp_path, monkeypatch, capsys,
                                                  point, k, error):
    # Raised where the writer's own calls would raise (no file name in the error, like
    # os.write): the message must still name the file being written.
    def fault(p, n=None):
        if (p, n) == (point, k):
            raise error

    monkeypatch.setattr(_convert, "_fault", fault)
    dst = tmp_path / "dst"
    assert _cli.main(["convert", "--quiet", str(ckpt[0]), str(dst)]) == 2
    err = capsys.readouterr().err
    partial = _convert.partial_dir(dst)
    named = (f"{partial}/model-{k:05d}-of-00004.safetensors.incomplete" if point == "write"
             else f"{partial}/{_convert.MANIFEST}")
    text = getattr(error, "strerror", None) or str(error)
    assert text in err and named in err and "Traceback" not in err, err
    assert f"({k - (point == 'write')} of 4 shards done and verified, " in err
    assert not dst.exists()
    assert not list(partial.glob("*.incomplete"))  # half a shard is removed at once
    monkeypatch.undo()
    _settle(ckpt, dst, capsys, reused=k - (point == "write"))


def test_unwritable_destination_is_exit_2(ckpt, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    dst = tmp_path / "file" / "dst"  # its parent is a file
    assert _cli.main(["convert", "--quiet", str(ckpt[0]), str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'file'} is not a directory" in err and "Traceback" not in err, err
    assert _tree(ckpt[0]) == ckpt[1]


def test_stale_partial_from_another_source_is_removed(ckpt, tmp_path, monkeypatch, capsys):
    dst, other = tmp_path / "dst", tmp_path / "other"
    write_checkpoint(other, layers=2, experts=2, seed=2)
    monkeypatch.setattr(_convert, "_fault", _interrupt_at("shard", 2))
    with pytest.raises(KeyboardInterrupt):
        _convert.convert(other, dst, progress=False)
    monkeypatch.undo()
    assert len(_manifest(dst)["shards"]) == 2
    _convert.convert(ckpt[0], dst, progress=False, log=print)
    assert "left by an interrupted run" in capsys.readouterr().out
    assert _tree(dst) == ckpt[2]


def test_partial_with_damaged_or_foreign_files(ckpt, tmp_path, monkeypatch, capsys):
    dst = tmp_path / "dst"
    monkeypatch.setattr(_convert, "_fault", _interrupt_at("shard", 3))
    with pytest.raises(KeyboardInterrupt):
        _convert.convert(ckpt[0], dst, progress=False)
    monkeypatch.undo()
    partial = _convert.partial_dir(dst)
    shard = partial / "model-00002-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # a flipped bit: same size, another checksum
    shard.write_bytes(bytes(data))
    (partial / "model-00003-of-00004.safetensors").unlink()
    (partial / "junk").write_text("x")
    _settle(ckpt, dst, reused=1)
    out = capsys.readouterr().out
    assert "model-00002-of-00004.safetensors: size or checksum differs" in out
    assert "model-00003-of-00004.safetensors: missing" in out
    # a partial directory without a manifest is not trusted
    shutil.rmtree(dst)
    partial.mkdir()
    (partial / "model-00001-of-00004.safetensors").write_text("not ours")
    old_style = tmp_path / ".dst.k3j_x9.partial"  # mkdtemp's name, before resuming existed
    old_style.mkdir()
    _convert.convert(ckpt[0], dst, progress=False, log=print)
    out = capsys.readouterr().out
    assert "no readable manifest" in out and f"note: {old_style} was left by an older" in out
    assert _tree(dst) == ckpt[2] and old_style.exists()


def test_changed_source_invalidates_the_partial(ckpt, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    shutil.copytree(ckpt[0], src)
    dst = tmp_path / "dst"
    monkeypatch.setattr(_convert, "_fault", _interrupt_at("shard", 1))
    with pytest.raises(KeyboardInterrupt):
        _convert.convert(src, dst, progress=False)
    monkeypatch.undo()
    os.utime(src / "config.json", ns=(1, 1))  # a source file changed since
    summary = _convert.convert(src, dst, progress=False, log=print)
    assert summary["reused_shards"] == 0
    assert "another source, options or version" in capsys.readouterr().out


def test_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    with _fslock.FileLock(path) as a:
        assert a.flock and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(_fslock.LockHeld, match=f"pid {os.getpid()} on host"):
            _fslock.FileLock(path).acquire()  # another open file description: refused
    assert not path.exists()  # removed on release
    # a holder killed with SIGKILL: its record stays, its lock does not
    code = (f"import fcntl, os, json; fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid()})"
            ".encode()); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code], check=False)
    with _fslock.FileLock(path) as b:
        assert b.previous.get("pid") not in (None, os.getpid())


def test_lock_without_flock_falls_back_to_exclusive_create(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_fslock.fcntl, "flock", no_flock)
    path = tmp_path / "x.lock"
    with _fslock.FileLock(path) as a:
        assert not a.flock
        with pytest.raises(_fslock.LockHeld, match=f"pid {os.getpid()}"):
            _fslock.FileLock(path).acquire()  # a live holder
    assert not path.exists()
    # a record naming a dead pid on this host is stale: taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": 0}))
    with _fslock.FileLock(path) as b:
        assert b.previous["pid"] == dead.pid
    # ... but not one from another host, whose pids we cannot check
    path.write_text(json.dumps({"pid": dead.pid, "host": f"elsewhere-{uuid.uuid4()}"}))
    with pytest.raises(_fslock.LockHeld, match="on host elsewhere"):
        _fslock.FileLock(path).acquire()
