"""Training and evaluation of one head bank (one seed): the authors' linear-probe loop, resumable.

Per optimizer step: ``accum_iter`` micro-batches, each one encoder pass shared by every head; the
bank's summed loss (each head's loss depends only on its own parameters) is backpropagated into the
bank's flat gradient, which is averaged over processes once per step (:class:`~beyond_cls.probe.step.BankStep`,
CUDA-graph-captured on CUDA). Epochs follow the authors' loop (MAE's ``train_one_epoch``): the learning rate is
set at the first micro-batch ``j`` of each accumulation window to the MAE schedule at ``epoch + j / M`` (``M``:
micro-batches per epoch and process), and the micro-batches after the epoch's last whole step are forwarded and
backpropagated (their BatchNorm statistics update) but never stepped: their gradient is zeroed at the epoch end.
A state is saved only at an optimizer-step boundary or at the epoch end after the leftovers, so a resume
position is (epoch, optimizer steps done), the leftovers following the last step. At step boundaries
three flags decide what happens: a non-finite loss (stop, keep the last good checkpoint), a preemption
signal (save, exit), a checkpoint due.

No step waits for the device to decide them (see :class:`_StepFlags`). The non-finite flags of step k
are copied to the host without blocking and read at the end of step k + 1, by then normally already
there. The preemption and checkpoint flags are host-side: one process uses them at once; several add
them to the same small all-reduce (every process then reads the same decision at the same step, one
step later). Whenever a state is about to be saved, the current step's flags are read first, before
its update, so a saved state never holds a non-finite update. A lagged detection leaves the bad
update in memory, never on disk: the run stops with :class:`NonFiniteLoss` either way.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from beyond_cls.config import ConfigError
from beyond_cls.optim import LARS, mae_lr
from beyond_cls.probe.bank import HeadBank
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.distributed import DistEnv, all_gather_objects, all_reduce_sum
from beyond_cls.probe.logs import MetricLog
from beyond_cls.probe.metrics import mean_average_precision, topk_correct
from beyond_cls.probe.state import STATE_FILE, STATE_VERSION, PreemptionWatch, load_state, save_atomic
from beyond_cls.probe.step import BankStep
from beyond_cls.run_summary import RunClock, format_duration, probe_units, progress_line
from beyond_cls.runtime import autocast, autocast_dtype
from beyond_cls.units import format_lrs

__all__ = ["FAULT_ENV", "RESUME_KEYS", "NonFiniteLoss", "Preempted", "ProbeTrainer", "check_resumable"]

# Test hook: "KILL@7" / "TERM@7" sends that signal to this process after global optimizer step 7.
FAULT_ENV = "BEYOND_CLS_FAULT"
# Settings that change what is trained (encoder, data, heads, schedule, views): they must match to resume a
# checkpoint. The rest only change speed, precision or logging (workers, cache folder, --precision, decode...).
RESUME_KEYS = (
    "model", "checkpoint", "checkpoint_format", "arch", "source", "dataset", "data", "subset_file", "img_size",
    "block", "blocks", "final_norm", "heads", "lrs", "blr", "lr", "min_lr", "epochs", "warmup_epochs", "optimizer",
    "momentum", "weight_decay", "views", "mean", "std", "crop", "head_init", "n_last_blocks", "crop_pct",
    "interpolation",
)
_PATH_KEYS = ("checkpoint", "data", "subset_file")
# Settings added later, with the value the runs before them trained with (0.2: the crop and the head init).
_ABSENT = {"crop": "torchvision", "head_init": "mae", "crop_pct": 0.875, "interpolation": "bicubic"}


def _trained(config: dict[str, Any]) -> dict[str, Any]:
    """The :data:`RESUME_KEYS` values of a config dict; paths made absolute, ``views`` as ProbeConfig.views()."""
    out = {k: config.get(k, _ABSENT.get(k)) for k in RESUME_KEYS}
    for k in _PATH_KEYS:
        if isinstance(out[k], str):
            out[k] = os.path.abspath(os.path.expanduser(out[k]))
    views = config.get("cache_views")
    out["views"] = (views or 1) if config.get("cache") is not None else views
    return out


def check_resumable(path: Path, state: dict[str, Any], cfg: ProbeConfig, seed: int, effective_batch: int,
                    layout: tuple[int, int, int] | None = None) -> None:
    """ConfigError naming every setting (old → new) in which ``state``, read from ``path``, differs from ``cfg``;
    or, for an unfinished state of an older version, saying that it cannot be continued.

    ``layout``: (batch size, processes, accum_iter) of this run; the epoch ends and the lr spacing depend on it,
    so a state that records another one is refused (states without it are finished older runs)."""
    version = state.get("version", STATE_VERSION)  # load_state's states always carry one
    if version != STATE_VERSION and state.get("final") is None:
        raise ConfigError(
            f"{path}: an unfinished run of probe checkpoint version {version} (epoch ends: whole steps dropped, lr "
            f"spaced per step), which version {STATE_VERSION} (the authors' epoch ends) cannot continue; rerun with "
            "--resume none or a new --out"
        )
    saved, current = _trained(state["config"]), _trained(asdict(cfg))
    diffs = [(k, saved[k], current[k]) for k in RESUME_KEYS if saved[k] != current[k]]
    diffs += [(k, old, new) for k, old, new in (("effective batch", state["effective_batch"], effective_batch),
                                                 ("seed", state["seed"], seed)) if old != new]
    old_layout = state.get("layout")
    if layout is not None and old_layout is not None and tuple(old_layout) != tuple(layout):
        diffs.append(("batch size × processes × accum_iter", "×".join(map(str, old_layout)),
                      "×".join(map(str, layout))))
    if diffs:
        detail = ", ".join(f"{k}: {old!r} → {new!r}" for k, old, new in diffs)
        raise ConfigError(f"{path} was written by a run with other settings ({detail}); "
                          "use a new --out or --resume none")


class NonFiniteLoss(ValueError):
    """A head's loss became NaN or inf; no state after that step was saved."""


class Preempted(Exception):
    """SIGTERM / SIGUSR1 arrived; the state was saved. ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _StepFlags:
    """One optimizer step's flags on their way to the host, without stalling the device queue.

    ``values``: per head 1 where the step's loss is not finite; with several processes also the preemption
    and checkpoint-due counts, summed over processes. From a CUDA device they are copied into pinned memory
    with ``non_blocking`` and an event marks their arrival: :meth:`read` waits for that event only. Read one
    step later, the device meanwhile has the next step's work queued, so it never runs dry.
    """

    def __init__(self, values: Tensor, epoch: int, step: int, host: tuple[bool, bool]) -> None:
        self.epoch, self.step, self.host = epoch, step, host  # host: this process's (preempt, save due)
        self.where = f"epoch {epoch + 1}, step {step + 1}"  # for the non-finite message
        self._ready: torch.cuda.Event | None = None
        if values.device.type == "cuda":
            self._values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._values.copy_(values, non_blocking=True)  # into pinned memory: asynchronous
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(values.device))
        else:
            self._values = values

    def read(self, heads: int) -> tuple[list[int], bool, bool]:
        """(indices of the heads with a non-finite loss, stop, save): the summed flags, else this process's."""
        if self._ready is not None:
            self._ready.synchronize()
        values = self._values.tolist()
        bad = [h for h, v in enumerate(values[:heads]) if v > 0]
        if len(values) == heads:
            return bad, self.host[0], self.host[1]
        return bad, values[heads] > 0, values[heads + 1] > 0


class ProbeTrainer:
    """One seed's head bank with its optimizer, schedule, checkpoints and metrics."""

    def __init__(
        self,
        cfg: ProbeConfig,
        env: DistEnv,
        seed: int,
        out: Path,
        bank: HeadBank,
        stream: Any,
        steps_per_epoch: int,
        effective_batch: int,
        accum_iter: int,
        multilabel: bool,
        micro_per_epoch: int | None = None,
        clock: RunClock | None = None,
        eval_batches: int = 0,
    ) -> None:
        if steps_per_epoch < 1:
            raise ConfigError(
                f"the training set is smaller than one optimizer step ({effective_batch} images); "
                "lower --batch-size / --accum-iter / --effective-batch"
            )
        self.cfg, self.env, self.seed, self.out = cfg, env, seed, out
        self.stream, self.steps_per_epoch = stream, steps_per_epoch
        # micro-batches per epoch and process (the stream's; default: no leftovers after the last step)
        self.micro_per_epoch = steps_per_epoch * accum_iter if micro_per_epoch is None else micro_per_epoch
        if not steps_per_epoch * accum_iter <= self.micro_per_epoch < (steps_per_epoch + 1) * accum_iter:
            raise ValueError(f"micro_per_epoch {micro_per_epoch} does not give {steps_per_epoch} steps of "
                             f"{accum_iter} micro-batches")
        self.layout = (cfg.batch_size, env.world_size, accum_iter)
        self.effective_batch, self.accum_iter, self.multilabel = effective_batch, accum_iter, multilabel
        self.device = env.device
        self.bank = bank.to(self.device)
        groups = self.bank.param_groups(effective_batch / 256)
        if cfg.lr is not None:
            for group in groups:
                group["base_lr"] = cfg.lr
        if cfg.optimizer == "lars":
            self.optimizer: torch.optim.Optimizer = LARS(groups, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self._amp_dtype() == torch.float16)
        self.steps = BankStep(self.bank, self.optimizer, accum_iter=accum_iter, amp_dtype=self._amp_dtype(),
                              multilabel=multilabel, scaler=self.scaler, distributed=env.distributed,
                              graphs="auto" if cfg.cuda_graphs else "off", say=print if env.is_main else None)
        self.log = MetricLog(out, enabled=env.is_main)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.final: dict[str, dict[str, float]] | None = None
        self.images_skipped = 0  # train images skipped, all processes and epochs, as of the last save
        self._skipped_here = 0  # ... plus this process's since then (added in at each save)
        self.eval_images, self.eval_skipped = 0, 0  # of the last evaluation, all processes
        self.images_trained = 0  # by this call of fit (all processes), for the closing images/s
        self._last_save = time.monotonic()
        self._good_state: Path | None = None  # this run's last state on disk (loaded or saved), if any
        self._pending: _StepFlags | None = None  # the last step's flags, not read yet
        # the run's ETA: micro-batches and evaluation batches (eval_batches per evaluation and process) of every
        # seed when the caller shares one clock among seeds, else this seed's
        self.eval_batches = eval_batches
        self.clock = clock or RunClock(self._units())

    # ----------------------------------------------------------------------------------- state
    def _units(self) -> int:
        return probe_units(self.cfg.epochs, self.cfg.eval_every, self.micro_per_epoch, self.eval_batches)

    def _units_done(self) -> int:
        """Units of :attr:`clock` a loaded state had done: its micro-batches and evaluations."""
        if self.final is not None:
            return self._units()
        return self.epoch * self.micro_per_epoch + self.step * self.accum_iter + len(self.history) * self.eval_batches

    def _amp_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.cfg.precision, self.device)

    @property
    def state_path(self) -> Path:
        return self.out / STATE_FILE

    def _sync_buffers(self) -> None:
        """Give every process rank 0's BatchNorm running statistics (DDP updates them per process)."""
        if self.env.distributed:
            for buf in self.bank.buffers():
                dist.broadcast(buf, src=0)

    def _sync_skipped(self) -> None:
        """Add every process's train skips since the last save into :attr:`images_skipped` (collective)."""
        here = self._skipped_here
        if self.env.distributed:
            local = torch.tensor([float(here)], dtype=torch.float64, device=self.device)
            here = int(all_reduce_sum(local, self.env).item())
        self.images_skipped += here
        self._skipped_here = 0

    def image_counts(self) -> dict[str, int]:
        """Train images skipped (all epochs and processes), eval images evaluated and skipped (last evaluation)."""
        return {"train_skipped": self.images_skipped + self._skipped_here, "eval_images": self.eval_images,
                "eval_skipped": self.eval_skipped}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "beyond_cls.probe",
            "version": STATE_VERSION,
            "config": asdict(self.cfg),
            "seed": self.seed,
            "effective_batch": self.effective_batch,
            "layout": list(self.layout),  # batch size, processes, accum_iter
            "micro_per_epoch": self.micro_per_epoch,
            "heads": [e.key for e in self.bank.entries],
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "bank": self.bank.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "final": self.final,
            "images_skipped": self.images_skipped,
            "eval_images": self.eval_images,
            "eval_skipped": self.eval_skipped,
            "rng_cpu": torch.get_rng_state(),
        }

    def save(self) -> None:
        """Write the state atomically (main process; every process holds the same state)."""
        self._sync_buffers()
        self._sync_skipped()
        if self.env.is_main:
            save_atomic(self.state_dict(), self.state_path)
        self._last_save = time.monotonic()
        self._good_state = self.state_path

    def load(self, path: Path) -> None:
        state = load_state(path)
        check_resumable(path, state, self.cfg, self.seed, self.effective_batch, self.layout)
        self.history, self.final = state["history"], state["final"]
        if self.final is None:  # a finished run's results are reused and nothing is trained: its weights, which
            # may be of heads built the 0.1 way (abmilp:RUN loads those), are not needed here
            self.bank.load_state_dict(state["bank"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.images_skipped = state["images_skipped"]
        self.eval_images, self.eval_skipped = state.get("eval_images", 0), state.get("eval_skipped", 0)
        torch.set_rng_state(state["rng_cpu"])
        self._good_state = path

    def resume_path(self) -> Path | None:
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            return self.state_path if self.state_path.exists() else None
        path = Path(self.cfg.resume)
        if not path.exists():
            raise ConfigError(f"--resume {path}: file not found")
        return path

    # ----------------------------------------------------------------------------------- training
    def _set_lr(self, epoch_float: float) -> float:
        factor = 0.0
        for group in self.optimizer.param_groups:
            cfg = self.cfg
            group["lr"] = mae_lr(epoch_float, group["base_lr"], cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
            factor = group["lr"] / group["base_lr"]
        return factor

    def _launch_flags(self, step_loss: Tensor, preempt: PreemptionWatch) -> _StepFlags:
        """The flags of the step just accumulated, started on their way to the host (no wait on the device)."""
        save_due = time.monotonic() - self._last_save >= self.cfg.ckpt_minutes * 60
        host = (preempt.signal_name is not None, save_due and self.env.is_main)
        values = (~torch.isfinite(step_loss)).to(torch.float64)
        if self.env.distributed:
            extra = torch.tensor([float(host[0]), float(host[1])], dtype=torch.float64)
            if self.device.type == "cuda":
                extra = extra.pin_memory()
            values = all_reduce_sum(torch.cat([values, extra.to(self.device, non_blocking=True)]), self.env)
        return _StepFlags(values, self.epoch, self.step, host)

    def _read_flags(self, flags: _StepFlags) -> tuple[bool, bool]:
        """(stop, save) of ``flags``; raises :class:`NonFiniteLoss` when a head's loss was not finite."""
        bad, stop, save = flags.read(len(self.bank.entries))
        if bad:
            heads = ", ".join(self.bank.entries[h].key for h in bad)
            kept = (f"{self._good_state} keeps the last good state (nothing after that step was saved)"
                    if self._good_state is not None else "no checkpoint of this run was saved before it")
            raise NonFiniteLoss(
                f"non-finite loss in head(s) {heads} at {flags.where}; "
                f"training stopped and {kept}. Lower --lrs for these heads, or use --precision bf16/fp32 instead "
                "of fp16"
            )
        return stop, save

    def _at(self, micro: int) -> float:
        """The schedule's (fractional) epoch at micro-batch ``micro`` of this epoch: the authors' spacing."""
        return self.epoch + micro / self.micro_per_epoch

    def _train_epoch(self, preempt: PreemptionWatch) -> None:
        cfg, bank, accum = self.cfg, self.bank, self.accum_iter
        heads = len(bank.entries)
        step_loss = torch.zeros(heads, dtype=torch.float64, device=self.device)
        window_loss = torch.zeros(heads, dtype=torch.float64, device=self.device)
        window_images, window_steps, window_start = 0, 0, time.perf_counter()
        lr_factor = 0.0
        first, stepped = self.step * accum, self.steps_per_epoch * accum  # micro-batches; after `stepped`: left over
        batches: Iterator = self.stream.train_batches(self.epoch, self.step)
        bar = tqdm(
            batches, total=self.micro_per_epoch - first, disable=not (cfg.progress and self.env.is_main), leave=False,
            desc=f"seed {self.seed} epoch {self.epoch + 1}/{cfg.epochs}", unit="batch", dynamic_ncols=True,
        )
        stream = iter(bar)
        self.clock.mark()
        for micro, (tokens, selections, targets, skipped) in enumerate(islice(stream, stepped - first), first):
            a = micro % accum
            if a == 0:
                lr_factor = self._set_lr(self._at(micro))
            losses = self.steps.micro(tokens, selections, targets)
            step_loss += losses.double() / accum
            self.clock.advance()
            window_images += tokens.shape[0]
            self.images_trained += tokens.shape[0] * self.env.world_size
            self._skipped_here += skipped
            if a < accum - 1:
                continue
            flags = self._launch_flags(step_loss, preempt)
            previous, self._pending = self._pending, None
            stop, save_due = self._read_flags(previous) if previous is not None else (False, False)
            if not self.env.distributed:
                stop, save_due = flags.host  # known here: no need to wait for the device
            if stop or save_due:  # a state will be saved after this step: its losses must be finite
                now = self._read_flags(flags)  # before the update, which is then never applied
                stop, save_due = stop or now[0], save_due or now[1]
            else:
                self._pending = flags
            self.steps.update()
            self.step += 1
            self.global_step += 1
            window_loss += step_loss
            window_steps += 1
            step_loss.zero_()
            if window_steps == cfg.log_every or self.step == self.steps_per_epoch:
                self._log_window(window_loss / window_steps, window_images, time.perf_counter() - window_start,
                                 lr_factor, bar)
                window_loss.zero_()
                window_images, window_steps, window_start = 0, 0, time.perf_counter()
            self._inject_fault()
            if stop:
                self.save()
                raise Preempted(
                    f"{preempt.signal_name or 'a preemption signal'} received: saved {self.state_path} at epoch "
                    f"{self.epoch + 1}, step {self.step}/{self.steps_per_epoch}; rerun the same command to resume",
                    preempt.exit_code,
                )
            if save_due:
                self.save()
        self._finish_flags(preempt)  # the last step's, before the leftovers: a stop there saves at that step
        self._leftovers(stream, stepped, preempt)
        bar.close()

    def _leftovers(self, batches: Iterator, first: int, preempt: PreemptionWatch) -> None:
        """The micro-batches after the epoch's last optimizer step, from micro-batch ``first``: forwarded and
        backpropagated as in the authors' loop (BatchNorm statistics update, lr set per accumulation window),
        never stepped; their gradient is zeroed here, as the authors' next ``zero_grad`` does. A non-finite loss
        among them stops the run before the epoch's state is saved."""
        total: Tensor | None = None
        for micro, (tokens, selections, targets, skipped) in enumerate(batches, first):
            if micro % self.accum_iter == 0:
                self._set_lr(self._at(micro))
            losses = self.steps.micro(tokens, selections, targets).double()  # graph output: copied by the add
            total = losses + 0 if total is None else total + losses
            self.clock.advance()
            self.images_trained += tokens.shape[0] * self.env.world_size
            self._skipped_here += skipped
        if total is None:
            return
        flags = self._launch_flags(total, preempt)
        flags.where = f"epoch {self.epoch + 1}, in the micro-batches left over after its last step"
        self._read_flags(flags)
        self.bank.zero_grad()

    def _finish_flags(self, preempt: PreemptionWatch) -> None:
        """Read the last step's flags at the end of an epoch, before its state is evaluated or saved."""
        pending, self._pending = self._pending, None
        if pending is not None and self._read_flags(pending)[0] and self.env.distributed:
            self.save()
            raise Preempted(
                f"{preempt.signal_name or 'a preemption signal'} received: saved {self.state_path} at epoch "
                f"{self.epoch + 1}, step {self.step}/{self.steps_per_epoch}; rerun the same command to resume",
                preempt.exit_code,
            )

    def _log_window(self, mean_loss: Tensor, images: int, seconds: float, lr_factor: float, bar: tqdm) -> None:
        losses = mean_loss.tolist()
        ips = images * self.env.world_size / max(seconds, 1e-9)
        record = {
            "epoch": self._at(self.step * self.accum_iter),
            "lr_factor": lr_factor,
            "images_per_s": ips,
            "images_skipped": self.images_skipped + self._skipped_here,  # this process's since the last save
            "loss": {e.key: v for e, v in zip(self.bank.entries, losses)},
        }
        scalars = {f"loss/{e.key}": v for e, v in zip(self.bank.entries, losses)}
        scalars.update({"train/lr_factor": lr_factor, "train/images_per_s": ips})
        self.log.log(record, self.global_step, scalars)
        eta = format_duration(self.clock.eta())
        loss = f"{sum(losses) / len(losses):.4g}"  # the bank's mean
        if self.cfg.progress:
            bar.set_postfix_str(f"loss {loss}, lr {self._lr_text()}, {ips:.0f} img/s, run ETA {eta}")
        elif self.env.is_main:  # one line per window, e.g. for Slurm logs
            print(progress_line([
                ("seed", str(self.seed)), ("epoch", f"{self.epoch + 1}/{self.cfg.epochs}"),
                ("step", f"{self.step}/{self.steps_per_epoch}"), ("loss", loss), ("lr", self._lr_text()),
                ("img/s", f"{ips:.0f}"), ("ETA", eta),
            ]), flush=True)

    def _lr_text(self) -> str:
        """The learning rate the optimizer applies now: one value, or the bank's lowest..highest."""
        rates = sorted({group["lr"] for group in self.optimizer.param_groups})
        return "..".join(format_lrs([rates[0], rates[-1]] if len(rates) > 1 else rates))

    def _inject_fault(self) -> None:
        spec = os.environ.get(FAULT_ENV)
        if spec and "@" in spec:
            name, at = spec.split("@", 1)
            if int(at) == self.global_step:
                os.kill(os.getpid(), getattr(signal, f"SIG{name.upper()}"))

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, dict[str, float]]:
        """top-1 / top-5 in % (or mAP in % for multi-label sets) and aggregation entropy, per head."""
        self._sync_buffers()
        self.bank.eval()
        heads = self.bank.entries
        counts = torch.zeros(len(heads), 3, dtype=torch.float64, device=self.device)  # top1, top5, entropy
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # images evaluated, skipped
        scores: dict[str, list[Tensor]] = {e.key: [] for e in heads}
        labels: list[Tensor] = []
        self.clock.mark()
        try:
            for tokens, selections, targets, skipped in self.stream.eval_batches():
                self.clock.advance()
                total[1] += skipped
                if tokens.shape[0] == 0:
                    continue
                with autocast(self.cfg.precision, self.device):
                    logits, entropy = self.bank.forward_eval(tokens, selections)
                for h, e in enumerate(heads):
                    out = logits[e.key].float()
                    if self.multilabel:
                        scores[e.key].append(out.cpu())
                    else:
                        counts[h, :2] += topk_correct(out, targets)
                    counts[h, 2] += entropy[e.key]
                if self.multilabel:
                    labels.append(targets.cpu())
                total[0] += tokens.shape[0]
        finally:
            self.bank.train()
        all_reduce_sum(counts, self.env)
        n, skipped = all_reduce_sum(total, self.env).tolist()
        self.eval_images, self.eval_skipped = int(n), int(skipped)
        if n == 0:
            raise ConfigError(f"the evaluation set produced no images ({int(skipped)} skipped as unreadable)")
        results: dict[str, dict[str, float]] = {}
        if self.multilabel:
            gathered_labels = torch.cat([t for part in all_gather_objects(labels, self.env) for t in part])
        for h, e in enumerate(heads):
            entropy = float(counts[h, 2]) / n
            if self.multilabel:
                s = torch.cat([t for part in all_gather_objects(scores[e.key], self.env) for t in part])
                results[e.key] = {"mAP": 100 * mean_average_precision(s, gathered_labels), "entropy": entropy}
            else:
                results[e.key] = {
                    "top1": 100 * float(counts[h, 0]) / n, "top5": 100 * float(counts[h, 1]) / n, "entropy": entropy,
                }
        return results

    # ----------------------------------------------------------------------------------- driver
    def fit(self) -> dict[str, dict[str, float]]:
        """Train (resuming when a checkpoint says so) and return the final evaluation per head."""
        path = self.resume_path()
        if path is not None:
            self.load(path)
            self.clock.skip(self._units_done())
            if self.env.is_main:
                where = ("finished: its final evaluation is reused" if self.final is not None else
                         f"at epoch {self.epoch + 1}, step {self.step}/{self.steps_per_epoch}")
                print(f"resumed {path} {where}", flush=True)
        if self.final is not None:
            return self.final
        with PreemptionWatch() as preempt:
            while self.epoch < self.cfg.epochs:
                self._train_epoch(preempt)  # from its saved step on, its leftover micro-batches included
                self.epoch, self.step = self.epoch + 1, 0
                if self.cfg.eval_every and self.epoch % self.cfg.eval_every == 0 and self.epoch < self.cfg.epochs:
                    self._record_eval(self.evaluate())
                self.save()
            self.final = self.evaluate()
            self._record_eval(self.final)
            self.save()
        self.log.close()
        return self.final

    def _record_eval(self, results: dict[str, dict[str, float]]) -> None:
        self.history.append({"epoch": self.epoch, "results": results})
        scalars = {f"eval/{k}/{m}": v for k, r in results.items() for m, v in r.items()}
        counts = {"eval_images": self.eval_images, "eval_skipped": self.eval_skipped}
        self.log.log({"epoch": self.epoch, "eval": results, **counts}, self.global_step, scalars)
