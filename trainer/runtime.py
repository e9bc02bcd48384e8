"""Where and how a run executes: torchrun's ranks, the stop flag, the device, AMP, seeds, AutoBatch.

Nothing here knows about the data or the loop; `trainer.loop` asks these for a device, a dtype,
a batch size and a seed, and uses `Dist`'s collectives (no-ops in a single process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torch import distributed as dist
from torch import nn
from ultralytics.utils.torch_utils import init_seeds

from trainer.config import TrainError


def choose_amp(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool, str]:
    """(autocast dtype or None, use GradScaler, sentence to print) for --amp on `device`."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None, False, f"AMP: off ({'CPU default' if device.type != 'cuda' else 'as asked'}), fp32 training"
    if device.type != "cuda":
        if amp == "fp16":
            raise TrainError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on CPU")
        return torch.bfloat16, False, "AMP: bf16 autocast on CPU (as asked)"
    bf16_ok = torch.cuda.is_bf16_supported()
    if amp == "bf16" and not bf16_ok:
        raise TrainError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
    if amp in ("auto", "bf16") and bf16_ok:
        return torch.bfloat16, False, "AMP: bf16 autocast (GPU supports bf16; no GradScaler needed)"
    return torch.float16, True, "AMP: fp16 autocast + GradScaler" + (" (no bf16 on this GPU)" if amp == "auto" else "")


class Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and a few collectives that are no-ops alone."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cpu")

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        self.device = device
        if self.ddp and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(minutes=30))

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if any rank set `flag` (the shared stop flag)."""
        if not self.ddp:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.ddp:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self, *, together: bool = False) -> None:
        """Tear the process group down before the interpreter exits; `together` (a run every rank finished)
        waits at a barrier first, so that no rank destroys it while another still uses it."""
        if dist.is_available() and dist.is_initialized():
            if together:
                with contextlib.suppress(Exception):
                    dist.barrier()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class StopFlag:
    """First Ctrl-C / SIGTERM asks for a clean stop (last.pt is written); a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def resolve_device(spec: str, d: Dist) -> torch.device:
    """The torch device for --device (auto = CUDA if present; N = cuda:N); under torchrun, the process's
    LOCAL_RANK GPU. Parsed and checked by the loaders' own `default_device`, so both say the same."""
    from trainer.data.common import DataError, default_device

    spec = (spec or "auto").lower()
    spec = f"cuda:{spec}" if spec.isdigit() else spec
    if d.ddp and spec.startswith("cuda"):
        spec = f"cuda:{d.local_rank}"  # one GPU per torchrun process
    if spec != "auto" and spec != "cpu" and not spec.startswith("cuda"):
        raise TrainError(f"--device must be auto, cpu, cuda, cuda:N or N, got {spec!r}")
    try:
        dev = default_device(spec, d.local_rank)
    except DataError as e:
        raise TrainError(f"--{e}") from None
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index or 0)
        torch.cuda.set_device(dev)
    return dev


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (every device) with ultralytics' own helper (non-deterministic kernels)."""
    init_seeds(seed, deterministic=False)


def auto_batch(model: nn.Module, imgsz: int, device: torch.device, amp_dtype: torch.dtype | None,
               log: Callable[[str], None], default: int = 16) -> int:
    """Largest batch that fits: ultralytics' estimate (profile 1..N, linear fit), then a real probe step."""
    if device.type != "cuda":
        log(f"--batch -1 (AutoBatch) is GPU-only: using batch {default} on {device.type}")
        return default
    from ultralytics.utils.autobatch import autobatch

    b = autobatch(model, imgsz=imgsz, fraction=0.6, batch_size=default)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    while b >= 1:  # probe: one real forward/backward at the chosen size
        try:
            torch.cuda.reset_peak_memory_stats(device)
            img = torch.rand(b, 3, imgsz, imgsz, device=device)
            batch = {"img": img, "batch_idx": torch.zeros(0, device=device),
                     "cls": torch.zeros(0, 1, device=device), "bboxes": torch.zeros(0, 4, device=device)}
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _ = model.loss(batch)
            loss.sum().backward()
            model.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_reserved(device) / 2**30
            log(f"AutoBatch: batch {b} per GPU, probe used {peak:.2f} of {total:.1f} GiB")
            return b
        except torch.cuda.OutOfMemoryError:
            b //= 2
        finally:
            torch.cuda.empty_cache()
            model.criterion = None
    raise TrainError("AutoBatch: even batch 1 does not fit in GPU memory at this --imgsz")
