"""Process-level settings shared by the stages (torch threads) and the atomic checkpoint write."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded by mixing ``parts`` (seed, purpose, step...): the same draws on every device,
    after a resume, and in every process of a DDP run."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class Heartbeat:
    """A plain line at most every ``every`` seconds, for logs and pipes where no progress bar is drawn (a long
    quantizer or evaluation was silent there for minutes)."""

    def __init__(self, log: Callable[[str], None] | None, every: float = 60.0) -> None:
        self.log, self.every, self.last = log, every, time.monotonic()

    def __call__(self, message: Callable[[], str]) -> None:
        """Log ``message()`` when ``every`` seconds have passed since the last line (it is built only then)."""
        now = time.monotonic()
        if self.log is not None and now - self.last >= self.every:
            self.last = now
            self.log(message())


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """torch's global generator seeded for the block (modules draw their initial weights from it), and the
    caller's state restored afterwards (:func:`preserved_global_rng`): no trace in the caller's random stream."""
    with preserved_global_rng():
        torch.manual_seed(seed)  # the GPUs' generators too, restored with the CPU's
        yield


@contextmanager
def preserved_global_rng() -> Iterator[None]:
    """The caller's global random states (Python's, numpy's, torch's on the CPU and on this process's GPU)
    restored after the block: libraries a stage calls reseed them (the Trainer and ``transformers.set_seed``
    all three), and a script's own draws must not depend on having run a stage.

    Only this process's GPU (``LOCAL_RANK`` under ``accelerate launch``, else the first): reading a GPU's
    random state opens a CUDA context there, and every DDP process opening one on every GPU costs each GPU
    a context per process."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [resolve_device("cuda").index] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Set torch's thread count for the block and restore it afterwards.

    0 = all cores, shared by the processes ``accelerate launch`` started on this machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` through :func:`kgtok.artifacts.atomic_path`: a kill never leaves half a checkpoint,
    and two processes never share a temporary name."""
    from kgtok.artifacts import atomic_path

    check_free_space(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def check_free_space(path: Path, margin: int = 1 << 20) -> None:
    """Refuse a checkpoint write that cannot fit, before it starts: the size of the checkpoint it replaces
    (plus ``margin``) must be free. A first checkpoint has no estimate and is only caught if it fails."""
    import errno
    import shutil

    path = Path(path)
    if not path.exists():
        return
    needed = path.stat().st_size + margin
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"disk full: {free:,} bytes free, about {needed:,} needed for the checkpoint",
                      str(path))


def resolve_device(device: str) -> torch.device:
    """A stage's ``device`` setting as a torch device: ``auto`` is ``cuda`` when a GPU is present, else ``cpu``.

    Under ``accelerate launch`` each process takes the GPU of its ``LOCAL_RANK``.
    ``cuda`` without a GPU is an error (a silent fall-back would hide a broken set-up).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected auto, cpu or cuda")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device=cuda but torch sees no GPU (torch.cuda.is_available() is False); "
                         "use device=auto or device=cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # a precision setting's dtype

# bf16 autocast on the CPU only where it measured at least this much faster than fp32 on the model itself: a
# margin against timing noise, so a machine near parity keeps fp32 (its numbers unchanged).
BF16_MIN_SPEEDUP = 1.25


def timed_precisions(run: Callable[[], object], repeats: int = 2) -> dict[str, float]:
    """Milliseconds of one ``run()`` in fp32 and under CPU bf16 autocast (each after a warm-up call).

    Measured, not assumed: on one 2-core machine (AMX) bf16 autocast made SmolLM2's forward 2.8x faster, on
    others (AVX-512 without bf16, AVX2) bf16 matmul was 3x slower than fp32, and the tiny LM (width 128)
    was slower in bf16 even on the AMX machine."""
    def under(enabled: bool) -> Callable[[], object]:
        def autocast_run() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                return run()
        return autocast_run

    return timed_runs({"fp32": under(False), "bf16": under(True)}, repeats)


def timed_runs(runs: dict[str, Callable[[], object]], repeats: int = 2) -> dict[str, float]:
    """Milliseconds of one call of each of ``runs`` (after a warm-up call), one after the other in one
    process: a ratio of two of them holds under load that their absolute values do not. A run on a GPU
    must wait for its work itself (``torch.cuda.synchronize``)."""
    out = {}
    for name, run in runs.items():
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        out[name] = 1000 * (time.perf_counter() - start) / repeats
    return out


def resolve_precision(precision: str, device: torch.device, measure: Callable[[], dict[str, float]],
                      gpu_fallback: str = "fp16", *, measure_gpu: bool = False) -> tuple[str, dict[str, float]]:
    """A stage's ``precision`` setting as fp32, bf16 or fp16, and the timings that chose it (empty if none).

    ``auto``: on a GPU bf16 where supported, else ``gpu_fallback``; on the CPU bf16 when ``measure()`` (ms per
    precision, :func:`timed_precisions`) finds it :data:`BF16_MIN_SPEEDUP` faster, else fp32.  With
    ``measure_gpu`` a GPU that supports bf16 is measured the same way (a stage whose bf16 path was never
    timed on one: stage 1's), else it keeps fp32.  An explicit value the device cannot run is refused."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    gpu = device.type == "cuda"
    if precision == "fp16" and not gpu:
        raise ValueError("precision=fp16 needs a GPU (CPU fp16 is slower than fp32); use auto, fp32 or bf16")
    if precision == "bf16" and gpu and not torch.cuda.is_bf16_supported():
        raise ValueError("precision=bf16: this GPU does not support bf16; use auto, fp32 or fp16")
    if precision != "auto":
        return precision, {}
    if gpu and not measure_gpu:
        return ("bf16" if torch.cuda.is_bf16_supported() else gpu_fallback), {}
    if gpu and not torch.cuda.is_bf16_supported():
        return "fp32", {}
    timings = measure()
    chosen = "bf16" if timings["fp32"] >= BF16_MIN_SPEEDUP * timings["bf16"] else "fp32"
    return chosen, {key: round(value, 1) for key, value in timings.items()}


def remembered_precision(path: Path, choose: Callable[[], tuple[str, dict[str, float]]]
                         ) -> tuple[str, dict[str, float]]:
    """The precision an interrupted run of this stage chose (saved at ``path``, in its work folder), else
    ``choose()``, saved there: a resumed stage goes on in the precision it began in, whatever ``auto``
    would measure now."""
    from kgtok.artifacts import read_json, write_json_atomic

    saved = read_json(path)
    if isinstance(saved, dict) and saved.get("precision") in ("fp32", "bf16", "fp16"):
        return saved["precision"], saved.get("timings_ms") or {}
    precision, timings = choose()
    write_json_atomic(path, {"precision": precision, "timings_ms": timings})
    return precision, timings


def precision_line(stage: str, precision: str, timings: dict[str, float], what: str) -> str:
    """The log line of a measured choice, e.g. "finetune: bf16 (a step 902 ms against 1271 in fp32 here)"."""
    return (f"{stage}: {precision} ({what} {timings['bf16']:.0f} ms in bf16 against {timings['fp32']:.0f} in fp32 "
            f"here; bf16 needs {BF16_MIN_SPEEDUP:g}x)")


def measured_once(signature: dict[str, object], measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``measure()`` made once per machine and ``signature`` (the model's shape, batch, threads...), kept in
    kgtok's cache (``<cache>/precision/``) and read back after: timings move with the machine's load, and a
    choice made on them anew each run could differ between two runs of the same command."""
    import hashlib
    import json

    from kgtok.artifacts import cache_root, read_json

    key = {**signature, "cpu": cpu_model(), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root() / "precision" / f"{digest}.json"
    saved = read_json(path)
    if isinstance(saved, dict) and isinstance(saved.get("timings_ms"), dict):
        return saved["timings_ms"]
    timings = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "timings_ms": timings}, indent=1), encoding="utf-8")
    try:
        os.link(tmp, path)  # the first measurement wins: a process measuring at the same time reads it after
    except FileExistsError:
        timings = (read_json(path) or {}).get("timings_ms") or timings
    finally:
        tmp.unlink(missing_ok=True)
    return timings


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says: benchmarks record it, and the
    precision timings are kept per CPU."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
