"""Device choice, mixed precision and atomic file writes shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fishseg.errors import FishsegError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA on a machine without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FishsegError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU, where bf16 is slower on most machines."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def timed(function: Callable[[], Any], device: torch.device, repeats: int = 1) -> float:
    """Seconds for one call, the best of ``repeats`` (the least noisy estimate of the cost), with the
    device synchronised around each call (CUDA runs asynchronously)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


CPU = torch.device("cpu")
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 64  # images per backbone forward on a GPU: large enough to fill it, small enough for a T4's memory
MAX_CUDA_WORKERS = 16  # decoding workers per process on a GPU machine; more only add start-up time and memory


def default_batch_size(device: torch.device) -> int:
    """Images per backbone forward when the user names none: 8 on the CPU (as before), more on a GPU."""
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def default_num_workers(device: torch.device = CPU, processes: int = 1) -> int:
    """Image decoding workers when the user names none. On the CPU half the cores, leaving the rest to the
    backbone's own threads; on a GPU the backbone needs no core, so decoding gets this process's share of the
    ``processes`` on the machine (torchrun) less one core for the process itself."""
    cores = os.cpu_count() or 2
    if device.type == "cuda":
        return max(1, min(MAX_CUDA_WORKERS, cores // processes - 1))
    return min(8, cores // 2)


def make_output_dir(path: Path) -> Path:
    """Create the folder ``path`` (and its parents) for a command's outputs; say why when it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{blocker} is a file, not a folder" if blocker is not None
                  else f"{error.strerror or error} at {error.filename or path}")
        raise FishsegError(f"{path}: cannot create the output folder: {reason}; choose another --out") from None
    return path


@contextlib.contextmanager
def removed_on_error(folder: Path) -> Iterator[None]:
    """Remove ``folder`` when the block fails and the folder did not exist before it, so that a failed command
    leaves nothing new behind (Ctrl-C keeps it: finished work is worth resuming)."""
    created = not folder.exists()
    try:
        yield
    except Exception:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` and rename it into place only on success.

    A crash or an exception leaves the previous ``final`` (if any) untouched and no temp file.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, unlike mkstemp's 0600
    mode = tmp.stat().st_mode
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with a 0600 one of their own
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, hex (read in chunks: ``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 image``, ``2 images``: a count with its noun."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, indented for people reading it."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    """Read a JSON file, turning absence or corruption into a user-facing error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FishsegError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FishsegError(f"{path}: not valid JSON ({error})") from None
