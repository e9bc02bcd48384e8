"""The training loop: ultralytics' optimisation recipe on batches streamed from packed shards.

What ultralytics' ``BaseTrainer`` does, step for step (REFERENCE §2.4; the recipe is in `trainer.optim`):
accumulation to a nominal batch, warmup, ``clip_grad_norm_(10)``, ``ModelEMA``, loss × world_size under
DDP. `setup` reads the data's manifest and builds model, loaders and optimizer; `fit` runs epochs of
`train_epoch` (one `step` per batch) and `end_epoch` (validate, record, checkpoint).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Collection
from copy import deepcopy
from typing import Any

import torch
from ultralytics.utils.torch_utils import unwrap_model

from packer.progress import progress_bar
from trainer.config import TrainConfig, TrainError
from trainer.data.common import to_device
from trainer.evaluate import METRIC_KEYS, Evaluator, run_validation
from trainer.model import ModelError
from trainer.offline import setup_offline
from trainer.optim import warm_up, warmup_iters
from trainer.plots import TRAIN_BATCH_PLOTS, ValObserver
from trainer.prepare import PreparedRun
from trainer.records import TrainResult
from trainer.runtime import StopFlag
from trainer.stall import STALL_WARN_PCT, StallMeter, stall_advice

LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")
LOG_EVERY = 10  # steps between progress-bar refreshes (on CUDA each one waits for the queued steps)


class Run(PreparedRun):
    """One training run: `setup()` (from PreparedRun), then `fit()`; `train()` below runs both."""

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, stop: StopFlag) -> TrainResult:
        """Epochs from `start_epoch` to the end, an early stop, or a stop request (last.pt written)."""
        cfg = self.cfg
        self.rec.write_args(self.train_args())
        self.rec.trim_csv(self.start_epoch)
        self.scheduler.last_epoch = self.start_epoch - 1
        self.t_start, self.steps, self.last_opt_step = time.time(), 0, -1
        self.meter = StallMeter(self.device)
        self.done_epoch, self.mosaic_on = self.start_epoch - 1, cfg.mosaic > 0
        metrics: dict[str, float] = {}
        interrupted, epoch = False, self.start_epoch
        self.optimizer.zero_grad()
        self.log(f"training epochs {self.start_epoch + 1}..{cfg.epochs} -> {self.out}")
        while epoch < cfg.epochs:
            self._begin_epoch(epoch)
            tloss, done, interrupted = self.train_epoch(epoch, stop)
            if interrupted:  # keep the last complete epoch; this one restarts on resume
                if self.d.main:
                    self.save(epoch - 1, metrics, [self.rec.last])
                self.log(f"interrupted in epoch {epoch + 1} after {done}/{self.nb} steps: wrote {self.rec.last} "
                         f"(resume with --resume {self.rec.last}; epoch {epoch + 1} restarts)")
                break
            metrics, should_stop = self.end_epoch(epoch, tloss)
            self.done_epoch = epoch
            epoch += 1
            if should_stop:
                self.log(f"early stop: no val improvement for {cfg.patience} epochs "
                         f"(best epoch {self.stopper.best_epoch})")
                break
        if not interrupted and self.best_state is not None:
            self.final_validation()
        return self._finish(epoch, metrics, interrupted)

    def _begin_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'lr_scheduler.step() before optimizer.step()'
            self.scheduler.step()
        self.model.train()
        self.train_loader.set_epoch(epoch)
        want_mosaic = cfg.mosaic > 0 and not (cfg.close_mosaic and epoch >= cfg.epochs - cfg.close_mosaic)
        if epoch == self.start_epoch or want_mosaic != self.mosaic_on:
            self.train_loader.set_mosaic(want_mosaic)
            if self.mosaic_on and not want_mosaic:
                left = cfg.epochs - epoch  # fewer than close_mosaic when the run is that short (ultralytics' rule)
                self.log(f"closing mosaic for the last {left} epoch{'s' if left != 1 else ''} (close_mosaic {cfg.close_mosaic})")
            self.mosaic_on = want_mosaic
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.meter.reset()

    def train_epoch(self, epoch: int, stop: StopFlag) -> tuple[torch.Tensor, int, bool]:
        """One pass over the train loader: (mean loss items on the device, steps done, stop requested)."""
        nb, nw = self.nb, warmup_iters(self.cfg, self.nb, self.first_epochs)
        tloss = torch.zeros(3, device=self.device)
        stopped, i = False, -1
        pbar = self._progress_bar(epoch)
        it = iter(self.train_loader)
        for i in range(nb):
            self.meter.waiting()
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"the train loader yielded {i} batches, {nb} promised by len()") from None
            self.meter.got_batch()
            ni = i + nb * epoch
            if ni < TRAIN_BATCH_PLOTS:
                self.plots.train_batch(ni, batch)  # drawn on a thread; only the first three iterations
            if nw and ni <= nw:
                self.accumulate = warm_up(self.opt, self.cfg, ni, nw, epoch)
            tloss = (tloss * i + self.step(batch, ni)) / (i + 1)
            self.meter.step_done(int(batch["img"].shape[0]))
            self.steps += 1
            log_step = (i + 1) % LOG_EVERY == 0 or i + 1 == nb
            if pbar is not None:
                if log_step:
                    pbar.set_postfix_str(self._postfix(tloss), refresh=False)
                pbar.update(1)
            # under DDP the shared flag is a collective (and a device sync): every rank checks on log steps
            if (log_step or not self.d.ddp) and self.d.any_flag(stop.requested):
                stopped = True
                break
        if pbar is not None:
            pbar.close()
        return tloss, i + 1, stopped

    def _progress_bar(self, epoch: int) -> Any:
        if not self.d.main:
            return None
        return progress_bar(self.nb, f"{epoch + 1}/{self.cfg.epochs}", leave=True, bar_format="{l_bar}{bar:10}{r_bar}")

    def _postfix(self, tloss: torch.Tensor) -> str:
        img_s, stall = self.meter.read(self.d.world)
        losses = " ".join(f"{k.split('_')[0]}={v:.3f}" for k, v in zip(LOSS_NAMES, tloss.tolist(), strict=True))
        return f"{losses} img/s={img_s:.1f} stall={stall:.0f}%"

    def step(self, batch: dict[str, Any], ni: int) -> torch.Tensor:
        """Forward + backward of one batch, and the optimizer step when it completes an accumulation;
        returns the detached loss items (box, cls, dfl), left on the device (no sync)."""
        batch = to_device(batch, self.device, non_blocking=True)
        batch["img"] = batch["img"].float() / 255
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        # no gradient all-reduce on accumulation steps that do not end in an optimizer step
        sync = ni - self.last_opt_step >= self.accumulate
        no_sync = self.train_model.no_sync() if (self.d.ddp and not sync) else contextlib.nullcontext()
        with no_sync:
            with ctx:
                loss, items = self.train_model(batch)
                loss = loss.sum()
                if self.d.ddp:
                    loss = loss * self.d.world  # DDP averages gradients; ultralytics scales the loss back up
            self.scaler.scale(loss).backward()
        if sync:
            self._optimizer_step()
            self.last_opt_step = ni
        return torch.stack([torch.as_tensor(items[k], device=self.device).float() for k in LOSS_NAMES]).detach()

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        self.ema.update(self.model)

    def end_epoch(self, epoch: int, tloss: torch.Tensor) -> tuple[dict[str, float], bool]:
        """Validate (a collective: every rank evaluates its share), record, checkpoint; (metrics, early stop?)."""
        crit = unwrap_model(self.model).criterion
        if hasattr(crit, "update"):
            crit.update()
        lrs = {f"lr/pg{j}": g["lr"] for j, g in enumerate(self.optimizer.param_groups)}
        self.ema.update_attr(self.model, include=["yaml", "nc", "args", "names", "stride", "class_weights"])
        losses = tloss.tolist()
        metrics, val_loss, fitness = self.validate(losses)
        is_best = self.best_fitness is None or fitness > self.best_fitness
        if is_best:
            self.best_fitness = fitness
            if self.cfg.plots and self.val_loader is not None:  # for the final validation's plots
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.ema.ema.state_dict().items()}
        should_stop = self.stopper(epoch + 1, fitness) if self.val_loader is not None else False
        img_s, stall = self.meter.read(self.d.world)
        mem = torch.cuda.max_memory_reserved(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        if self.d.main:
            row: dict[str, Any] = {"epoch": epoch + 1, "time": round(time.time() - self.t_start, 3)}
            row.update({f"train/{k}": float(v) for k, v in zip(LOSS_NAMES, losses, strict=True)})
            row.update({k: float(metrics[k]) for k in METRIC_KEYS})
            row.update({f"val/{k}": float(val_loss.get(k, 0.0)) for k in LOSS_NAMES})
            row.update({k: float(v) for k, v in lrs.items()})
            row.update({"img_per_s": float(img_s), "data_stall_pct": float(stall), "gpu_mem_gb": float(mem)})
            self.rec.append_csv(row)
            self.plots.results(self.rec.csv)
            self.tb.scalars(row, epoch + 1)
            if epoch == 0:
                self.tb.images(self.plots.wait(), epoch + 1)
            self._print_epoch(epoch, metrics, img_s, stall, mem)
            self.save(epoch, metrics, [self.rec.last] + ([self.rec.best] if is_best else []))
        return metrics, should_stop

    def validate(self, losses: list[float]) -> tuple[dict[str, float], dict[str, float], float]:
        """(metrics, val losses, fitness): mAP50-95 of the EMA model, or minus the train loss without a val split."""
        if self.val_loader is None:
            return dict.fromkeys(METRIC_KEYS, 0.0), {}, -float(sum(losses))
        metrics, val_loss = run_validation(
            self.ema.ema, self.val_loader, Evaluator(nc=len(self.names), max_det=self.cfg.max_det),
            device=self.device, amp_dtype=self.amp_dtype)
        return metrics, val_loss, metrics["metrics/mAP50-95(B)"]

    def final_validation(self) -> None:
        """Validate the best weights once more for ultralytics' end-of-run plots (confusion matrix, PR/F1/P/R
        curves, val_batch0); every rank takes part (collective), rank 0 draws."""
        model = deepcopy(self.ema.ema)
        model.load_state_dict(self.best_state)
        seen = ValObserver(self.names)
        ev = Evaluator(nc=len(self.names), max_det=self.cfg.max_det)
        run_validation(model, self.val_loader, ev, device=self.device, amp_dtype=self.amp_dtype, with_loss=False,
                       on_batch=seen)
        seen.gather(self.device)
        self.plots.validation(ev, seen.confusion, seen.first)
        self.log(f"plots of the best weights' validation in {self.out}")

    def _print_epoch(self, epoch: int, metrics: dict[str, float], img_s: float, stall: float, mem: float) -> None:
        if self.val_loader is not None:
            m = [metrics[k] for k in METRIC_KEYS]
            self._log(f"{'':>4}{'val':<10}{'P':>8}{'R':>8}{'mAP50':>8}{'mAP50-95':>10}\n"
                      f"{'':>4}{'all':<10}{m[0]:>8.3f}{m[1]:>8.3f}{m[2]:>8.3f}{m[3]:>10.3f}")
        mem_txt = f"peak GPU mem {mem:.2f} GB" if self.device.type == "cuda" else "no GPU"
        self._log(f"    epoch {epoch + 1}: {img_s:.1f} img/s, data stall {stall:.1f}%, {mem_txt}")
        if stall > STALL_WARN_PCT:
            self._log(f"warning: {stall:.0f}% of step time was spent waiting for data (> {STALL_WARN_PCT:.0f}%): "
                      + stall_advice(getattr(self.train_loader, "kind", ""), self.cfg.workers))

    def _finish(self, epoch: int, metrics: dict[str, float], interrupted: bool) -> TrainResult:
        best = self.rec.finish(interrupted)
        steps_per_rank = self.d.gather(self.steps)
        if self.d.ddp:
            self.log(f"steps per rank: {', '.join(map(str, steps_per_rank))}")
        self.log(f"{'stopped' if interrupted else 'done'}: {epoch - self.start_epoch} epoch(s) in "
                 f"{(time.time() - self.t_start) / 60:.1f} min; best mAP50-95 "
                 f"{self.best_fitness if self.val_loader else 'n/a'}; weights in {self.rec.wdir}")
        return TrainResult(out=self.out, last=self.rec.last, best=best, epochs_done=epoch, metrics=metrics,
                           best_fitness=self.best_fitness, interrupted=interrupted, steps=self.steps)


def train(
    cfg: TrainConfig,
    *,
    loader_factory: Callable[..., Any] | None = None,
    log: Callable[[str], None] = print,
    given: Collection[str] | None = None,
) -> TrainResult:
    """Train a YOLO detector from packed shards; the whole `python -m trainer.run` job.

    Works alone or under torchrun (RANK/WORLD_SIZE/LOCAL_RANK); metrics and checkpoints come from rank 0.
    `loader_factory` defaults to `trainer.data.make_loader` (same signature). `given` names the options the
    caller set, for a resume (see `config.resume_config`; None = those that differ from the defaults). Raises TrainError/ModelError for
    bad options or data; a Ctrl-C returns a result with ``interrupted=True`` after writing last.pt.
    """
    setup_offline()  # a no-op after the CLI's call; fonts for the plots when a library caller forgot it
    run, finished = Run(cfg, loader_factory, log, given), False
    try:
        with StopFlag() as stop:
            run.setup()
            try:
                result = run.fit(stop)
                finished = True
                return result
            except KeyboardInterrupt:
                # second Ctrl-C (or one outside the step loop): keep what we have, without collectives
                if run.d.main and run.ema is not None:
                    done = run.start_epoch - 1 if run.done_epoch is None else run.done_epoch
                    with contextlib.suppress(Exception):
                        run.save(done, {}, [run.rec.last])
                raise
    except ModelError as e:
        raise TrainError(str(e)) from e
    finally:
        run.close()
        run.d.close(together=finished)
