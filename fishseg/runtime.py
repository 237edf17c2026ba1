"""Device choice, the precision policy, determinism and atomic file writes shared by every stage."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fishseg.config import PRECISIONS, check_precision, shown
from fishseg.errors import FishsegError

__all__ = ["PRECISIONS", "UNRECORDED", "Precision", "active_precision", "atomic_path", "autocast",
           "available_memory", "backward_step", "ddp_no_buffer_sync", "default_num_workers", "file_digest",
           "gpu_support_problem", "make_deterministic", "make_output_dir", "plural", "precision_policy",
           "precision_scope", "read_json", "removed_on_error", "require_same_precision", "requested_precision",
           "resolve_device", "timed", "write_json"]

logger = logging.getLogger(__name__)
UNRECORDED = "unrecorded"  # the precision of a cache or run written before fishseg recorded it
_ARCH = re.compile(r"(sm|compute)_(\d+)")
_DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_WARNED: set[str] = set()


def gpu_support_problem(index: int = 0) -> str | None:
    """Why the installed torch cannot run on GPU ``index``, or None when it can.

    It can when the build holds kernels (``sm_XY``) for the GPU's major version at or below its minor one
    (CUDA binaries run on later minors), or PTX (``compute_XY``) at or below its capability, which the driver
    compiles. Otherwise every kernel launch fails with "no kernel image is available" (e.g. a P100, 6.0, under
    a build for sm_70 … sm_90).
    """
    major, minor = torch.cuda.get_device_capability(index)
    arches = [(kind, int(number)) for kind, number in _ARCH.findall(" ".join(torch.cuda.get_arch_list()))]
    if not arches:
        return None  # a build that does not list its kernels: nothing to check against
    own = major * 10 + minor
    if any(number <= own and (kind == "compute" or number // 10 == major) for kind, number in arches):
        return None
    built = sorted({number for _, number in arches})
    return (f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) is not supported by this "
            f"torch {torch.__version__} build, which has kernels for sm_{built[0]}..sm_{built[-1]}")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present and supported by the installed torch (else the CPU, saying why);
    asking for CUDA on a machine without it, or on a GPU the build cannot run, is a user error."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        problem = gpu_support_problem()
        if problem and problem not in _WARNED:  # said once, though a sweep resolves its device twice
            _WARNED.add(problem)
            logger.warning("using the CPU: %s", problem)
        return torch.device("cpu" if problem else "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FishsegError(f"`device={shown(name)}`: CUDA is not available on this machine; use `device='cpu'`")
    device = torch.device(name)
    problem = gpu_support_problem(device.index or 0) if device.type == "cuda" else None
    if problem:
        raise FishsegError(f"`device={shown(name)}`: {problem}; use `device='cpu'`, or a torch build for this GPU")
    return device


@dataclasses.dataclass(frozen=True)
class Precision:
    """The autocast dtype of the backbone and of the decoder; None runs that part in full fp32."""

    requested: str  # one of PRECISIONS, as asked
    backbone: torch.dtype | None
    decoder: torch.dtype | None

    def __post_init__(self) -> None:
        check_precision(self.requested)
        for part in (self.backbone, self.decoder):
            if part not in _DTYPE_NAMES:
                raise FishsegError(f"precision dtype {part}: expected one of bfloat16, float16 or None")

    @property
    def backbone_name(self) -> str:
        """What a cache records: ``fp32``, ``bf16`` or ``fp16``."""
        return _DTYPE_NAMES[self.backbone]

    @property
    def decoder_name(self) -> str:
        """What a run records: ``fp32``, ``bf16`` or ``fp16``."""
        return _DTYPE_NAMES[self.decoder]


def precision_policy(device: torch.device, requested: str = "auto") -> Precision:
    """The dtypes for ``device``, the one place that decides them.

    auto: fp32 on the CPU (reduced precision is slower there on most machines); bf16 for both parts on GPUs of
    compute capability 8.0 or more; below that, whose GPUs lack bf16 units, fp16 for the frozen backbone
    (inference only, no gradients to underflow) and fp32 for the decoder. ``fp16`` trains the decoder in fp16
    too, through a GradScaler; ``bf16`` on the CPU is allowed (it works, slowly), fp16 there is refused.
    """
    check_precision(requested)
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return Precision(requested, None, None)
    if device.type != "cuda":
        if requested == "fp16":
            raise FishsegError("`precision='fp16'`: needs a CUDA GPU; use 'fp32' (or 'bf16') on the CPU")
        return Precision(requested, torch.bfloat16, torch.bfloat16)
    major, minor = torch.cuda.get_device_capability(device)
    modern = major >= 8
    if requested == "bf16" and not modern:
        raise FishsegError(f"`precision='bf16'`: {torch.cuda.get_device_name(device)} (compute capability "
                           f"{major}.{minor}) has no bf16 units (they start at 8.0); use fp16 or auto")
    if requested == "fp16":
        return Precision(requested, torch.float16, torch.float16)
    return Precision(requested, torch.bfloat16, torch.bfloat16) if modern else Precision(requested, torch.float16, None)


_REQUESTED: contextvars.ContextVar[str] = contextvars.ContextVar("fishseg_precision", default="auto")


@contextlib.contextmanager
def precision_scope(requested: str) -> Iterator[None]:
    """Every stage run inside the block uses ``requested`` (one of PRECISIONS; ``auto`` outside any block)."""
    check_precision(requested)
    token = _REQUESTED.set(requested)
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def requested_precision() -> str:
    """The precision the innermost ``precision_scope`` asks for (``auto`` outside any)."""
    return _REQUESTED.get()


def active_precision(device: torch.device) -> Precision:
    """The policy for ``device`` under the innermost ``precision_scope``."""
    return precision_policy(device, requested_precision())


def autocast(device: torch.device, part: str) -> contextlib.AbstractContextManager:
    """Autocast ``part`` ("backbone" or "decoder") to its dtype under the active precision; nothing at fp32."""
    dtype = getattr(active_precision(device), part)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


_SCALERS: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()


def backward_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, device: torch.device) -> None:
    """``loss.backward()`` and an optimizer step; a decoder trained in fp16 goes through the optimizer's own
    GradScaler, without which its small gradients underflow to zero (bf16 has fp32's range: no scaler)."""
    if active_precision(device).decoder != torch.float16:
        loss.backward()
        optimizer.step()
        return
    scaler = _SCALERS.get(optimizer)
    if scaler is None:
        scaler = _SCALERS[optimizer] = torch.amp.GradScaler(device.type)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # skipped, with a smaller scale next time, when a gradient overflowed
    scaler.update()


def require_same_precision(recorded: str, now: str, source: Path, hint: str) -> None:
    """Refuse to continue work recorded at one precision with another (mixing them is neither run);
    work from before fishseg recorded precision continues at any."""
    if recorded not in (now, UNRECORDED):
        raise FishsegError(f"{source}: was started at precision {recorded}, this run would use {now}; {hint}")


def make_deterministic() -> None:
    """Make training repeat bit for bit on one machine: deterministic kernels only (an op without one fails
    instead of varying), cuBLAS's fixed workspace (read when CUDA starts, so call this before any CUDA work)
    and no cuDNN autotuning (whose pick may differ between runs)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def ddp_no_buffer_sync(ddp_init: Callable[..., Any]) -> dict[str, bool]:
    """The DistributedDataParallel keyword that skips the buffer broadcast before each forward:
    ``forward_sync_buffers=False`` where this torch has it, else ``broadcast_buffers=False``, the older
    switch (which also skips the broadcast at construction, harmless when every rank starts alike)."""
    if "forward_sync_buffers" in inspect.signature(ddp_init).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


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
        raise FishsegError(f"{path}: cannot create the output folder: {reason}; choose another `out`") from None
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
    if final.is_dir():
        raise FishsegError(f"{final}: is a folder; give the path of the file to write, not a folder")
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


def read_json(path: Path, advice: str = "") -> Any:
    """Read a JSON file, turning absence or corruption into a user-facing error that ends with ``advice`` (what
    to do, e.g. "restore it, or train again with --overwrite") where the caller knows it."""
    tail = f"; {advice}" if advice else ""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FishsegError(f"{path}: file not found{tail}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FishsegError(f"{path}: not valid JSON ({error}){tail}") from None
