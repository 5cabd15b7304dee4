"""Train one model on features: `Training(cfg, features, train, val)` is an iterator of typed
`Epoch`s, its `result` once they are done; `fit(...)` runs one to its end.

Pure: no Ray, no MLflow. The command line around it is mmsa/app/train.py (`python -m mmsa.train`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from mmsa.config import Config
from mmsa.data.dataset import LABELS
from mmsa.features.featureset import Features
from mmsa.data.splits import Split
from mmsa.models.factory import create_model
from mmsa.models.runtime import amp_dtype, autocast, for_device, predict_proba, resolve_device

EpochCallback = Callable[[int, dict], None]


class TrainingError(RuntimeError):
    """Training diverged (NaN/inf loss) or cannot proceed."""


@dataclass
class FitResult:
    metrics: dict  # of the best epoch (or the last, without validation)
    model: torch.nn.Module  # with the best epoch's weights
    cfg: Config  # what the model was built from: the config with its feature sizes
    history: list[dict] = field(default_factory=list)


def class_weights(kind: str, labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """none | balanced (n / (k * count)) | sqrt (its square root); normalised to mean 1."""
    if kind == "none":
        return torch.ones(num_classes)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = len(labels) / (num_classes * np.maximum(counts, 1))
    if kind == "sqrt":
        w = np.sqrt(w)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, prefix: str = "val_") -> dict:
    ids = list(range(len(LABELS)))
    per_class = f1_score(labels, preds, labels=ids, average=None, zero_division=0)
    out = {f"{prefix}acc": float(accuracy_score(labels, preds)),
           f"{prefix}macro_f1": float(f1_score(labels, preds, labels=ids, average="macro", zero_division=0))}
    out.update({f"{prefix}f1_{name}": float(v) for name, v in zip(LABELS, per_class)})
    out[f"{prefix}confusion"] = confusion_matrix(labels, preds, labels=ids).tolist()
    return out


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then cosine decay to 0: the same factors as transformers'
    get_cosine_schedule_with_warmup, without importing transformers into every trial process
    (about 0.2 GB each)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def length_grouped_batches(order: np.ndarray, lengths: np.ndarray, batch: int, rng: np.random.Generator,
                           group: int = 50) -> list[np.ndarray]:
    """Batches of `order` (already shuffled) whose texts have similar lengths, as Hugging Face's
    `group_by_length` makes them: each run of `group` batches is sorted by length and cut into
    batches, then the batches are shuffled. A batch is padded only to its own longest text
    (FeatureSet.batch), so little compute goes to padding; each batch still draws from a random
    `group * batch` pairs."""
    steps = []
    for s in range(0, len(order), group * batch):
        chunk = order[s:s + group * batch]
        chunk = chunk[np.argsort(-lengths[s:s + group * batch], kind="stable")]
        steps += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    return [steps[i] for i in rng.permutation(len(steps))]


@dataclass
class _Trainee:
    """What one model's training holds from epoch to epoch: the model, its optimizer, schedule,
    weight average, gradient scaler and batch order, and how it steps through its features."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: torch.nn.Module | None
    rng: np.random.Generator
    scaler: torch.amp.GradScaler | None  # fp16 training only
    features: Features
    weights: torch.Tensor  # each class's loss weight
    batch: int  # the effective batch, one optimizer step
    micro: int  # the part of it in memory at once (gradient accumulation)
    label_smoothing: float
    device: torch.device
    precision: str
    progress: bool  # a progress bar over each epoch's steps on stderr (epochs of minutes, finetune=full)
    grad_clip: float  # the gradients' global norm at most this; 0: not clipped
    augment: float  # the training pairs' image augmentation (finetune=full)

    @property
    def evaluated(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


def _new_trainee(model: torch.nn.Module, cfg: Config, features: Features, train: Split, device: torch.device,
                 progress: bool) -> _Trainee:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    t = cfg.train
    batch = min(t.batch_size, len(train))
    total_steps = math.ceil(len(train) / batch) * t.max_epochs
    pretrained, scale = model.pretrained_parameters()
    slow = set(pretrained)
    groups = [{"params": [p for p in model.parameters() if p not in slow], "lr": t.lr}]
    if pretrained:
        groups.append({"params": pretrained, "lr": t.lr * scale})
    optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema), use_buffers=True) if t.ema > 0 else None
    scheduler = warmup_cosine(optimizer, int(t.warmup_frac * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device, t.precision) == torch.float16 else None
    return _Trainee(model, optimizer, scheduler, ema, np.random.default_rng(t.seed), scaler, features,
                    class_weights(t.class_weights, train.labels, cfg.model.num_classes).to(device), batch,
                    min(t.micro_batch or batch, batch), t.label_smoothing, device, t.precision, progress,
                    t.grad_clip, t.augment)


def _train_epoch(member: _Trainee, train: Split, epoch: int) -> tuple[float, int]:
    """One pass over `train` in the member's own order; returns (summed loss, examples seen)."""
    model, features, batch, micro, device = member.model, member.features, member.batch, member.micro, member.device
    weights = member.weights
    model.train()
    order = member.rng.permutation(len(train))
    if getattr(model.cfg, "text_layers", 0) > 0:  # cached text layers train (last_k): cost grows with the longest text
        steps = length_grouped_batches(order, features.text_lengths(train.rows[order]), batch, member.rng)
    else:
        steps = [order[s:s + batch] for s in range(0, len(order), batch)]
    # Each step's micro-batches (sorted rows: locality in the cache); inputs arrive in this order.
    plan = [[np.sort(step[m:m + micro]) for m in range(0, len(step), micro)] for step in steps]
    inputs = features.iter_batches([train.rows[idx] for micros in plan for idx in micros], device,
                                   augment=member.augment)
    # summed on the device and read once per epoch: a read per micro-batch would wait for the GPU
    # to finish every step before the host could queue the next
    loss_sum, seen = torch.zeros((), device=device), 0
    planned = zip(steps, plan)
    if member.progress:
        import sys

        from tqdm.auto import tqdm
        planned = tqdm(planned, total=len(steps), desc=f"epoch {epoch}", unit="step", file=sys.stderr,
                       leave=False, mininterval=2.0)
    for step, (step_idx, micros) in enumerate(planned):
        weight_total = weights[torch.from_numpy(train.labels[step_idx]).to(device)].sum()
        member.optimizer.zero_grad(set_to_none=True)
        for idx in micros:
            y = torch.from_numpy(train.labels[idx]).to(device)
            with autocast(device, member.precision):
                logits = model(*next(inputs))
            per_example = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=member.label_smoothing)
            # Weighted mean over the whole effective batch, however it is split.
            loss = (per_example * weights[y]).sum() / weight_total
            (member.scaler.scale(loss) if member.scaler is not None else loss).backward()
            loss_sum += per_example.detach().sum()
            seen += len(idx)
        if member.grad_clip > 0:
            if member.scaler is not None:
                member.scaler.unscale_(member.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), member.grad_clip)
        if member.scaler is not None:  # skips the step where fp16 gradients overflowed
            member.scaler.step(member.optimizer)
            member.scaler.update()
        else:
            member.optimizer.step()
        member.scheduler.step()
        if member.ema is not None:
            member.ema.update_parameters(model)
    # the last step's gradients are not needed again: freed now, not at the next epoch's first step
    # (validation, the checkpoint and the next fold would otherwise run beside them)
    member.optimizer.zero_grad(set_to_none=True)
    total = float(loss_sum)
    if not math.isfinite(total):
        raise TrainingError(f"loss became {total} at epoch {epoch}")
    return total, seen


@dataclass
class FitState:
    """Where a fit stands after a finished epoch, enough to go on from there as if never stopped
    (a search trial's checkpoint, search/trainable.py): every tensor copied to the CPU."""

    epoch: int
    history: list[dict]
    best: dict | None
    stale: int
    best_state: dict  # the evaluated model's weights at the best epoch so far
    model: dict
    optimizer: dict
    scheduler: dict
    ema: dict | None
    scaler: dict | None
    rng: dict  # the batch order's generator
    torch_rng: torch.Tensor  # dropout, token dropout, DataLoader workers' seeds
    cuda_rng: list | None


def _on_cpu(state):
    """A (nested) state dict with every tensor copied to the CPU: a copy that training on does not change."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_on_cpu(v) for v in state)
    return copy.deepcopy(state)


def _snapshot(trainee: _Trainee, epoch: int, history: list[dict], best: dict | None, stale: int,
              best_state: dict) -> FitState:
    return FitState(epoch, copy.deepcopy(history), copy.deepcopy(best), stale, best_state,
                    _on_cpu(trainee.model.state_dict()), _on_cpu(trainee.optimizer.state_dict()),
                    trainee.scheduler.state_dict(), _on_cpu(trainee.ema.state_dict()) if trainee.ema else None,
                    trainee.scaler.state_dict() if trainee.scaler is not None else None,
                    copy.deepcopy(trainee.rng.bit_generator.state), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if trainee.device.type == "cuda" else None)


def _restore(trainee: _Trainee, state: FitState) -> None:
    trainee.model.load_state_dict(state.model)
    trainee.optimizer.load_state_dict(state.optimizer)  # its tensors go to each parameter's device
    trainee.scheduler.load_state_dict(state.scheduler)
    if trainee.ema is not None and state.ema is not None:
        trainee.ema.load_state_dict(state.ema)
    if trainee.scaler is not None and state.scaler is not None:
        trainee.scaler.load_state_dict(state.scaler)
    trainee.rng.bit_generator.state = state.rng
    torch.set_rng_state(state.torch_rng)
    if state.cuda_rng is not None and trainee.device.type == "cuda":
        torch.cuda.set_rng_state_all(state.cuda_rng)


@dataclass(frozen=True)
class Epoch:
    """What training says after every epoch."""

    number: int  # 1-based
    metrics: dict  # the epoch's (no probabilities), with best_<monitor> and <other>_at_best so far
    last: bool  # the fit's last epoch: its schedule's end, or early stopping
    state: FitState | None = None  # where the fit stands (Training(keep_state=True))


class Training:
    """One model's training, epoch by epoch: `for epoch in Training(...)`, then `result`.

    `progress`: a bar over each epoch's steps on stderr (the CLIs turn it on for finetune=full).
    `keep_probs`: every epoch's history entry keeps `probs`, the validation rows' class
    probabilities (for out-of-fold blends). `keep_state`: every Epoch carries where the fit stands;
    `start`: such a state to go on from (the same config and data; the micro-batch may differ).
    `keep_best=False`: the result's model keeps its last epoch's weights, and no copy of the best
    epoch's is made (cross-validation scores the curves and discards the model: a copy of the
    weights per improved epoch, and in every checkpoint, would buy nothing). The result's config is
    `cfg` with the feature sizes its model was built with."""

    def __init__(self, cfg: Config, features: Features, train: Split, val: Split | None = None, *,
                 progress: bool = False, keep_probs: bool = False, start: FitState | None = None,
                 keep_state: bool = False, keep_best: bool = True):
        self.cfg, self.features, self.train, self.val = cfg, features, train, val
        self.progress, self.keep_probs, self.start = progress, keep_probs, start
        self.keep_state, self.keep_best = keep_state, keep_best
        self.result: FitResult | None = None

    def __iter__(self) -> Iterator[Epoch]:
        self.result = yield from self._epochs()

    def _epochs(self):
        cfg, features, train, val, t = self.cfg, self.features, self.train, self.val, self.cfg.train
        if t.num_threads > 0:
            torch.set_num_threads(t.num_threads)
        torch.manual_seed(t.seed)
        device = resolve_device(t.device)
        if device.type == "cuda":  # each fit's peaks its own (a fold's, not the trial's or an earlier trial's)
            torch.cuda.reset_peak_memory_stats(device)
        cfg = cfg.with_features(features)
        trainee = _new_trainee(for_device(create_model(cfg), device), cfg, features, train, device, self.progress)
        history: list[dict] = []
        best: dict | None = None
        best_state: dict = {}
        stale = 0
        if self.start is not None:
            _restore(trainee, self.start)
            history, best, stale = copy.deepcopy(self.start.history), copy.deepcopy(self.start.best), self.start.stale
            best_state = self.start.best_state
        last_epoch = t.stop_epoch or t.max_epochs
        for epoch in range(len(history) + 1, last_epoch + 1):
            metrics = _run_epoch(trainee, features, train, val, epoch, self.keep_probs)
            history.append(metrics)
            if val is None or best is None or metrics[t.monitor] > best[t.monitor]:
                # on the CPU: beside the model, its gradients, AdamW's moments and the EMA on the GPU,
                # a fourth copy of the weights there would buy nothing but memory
                best, stale = metrics, 0
                if self.keep_best:
                    best_state = _on_cpu(trainee.evaluated.state_dict())
            else:
                stale += 1
            stop = epoch == last_epoch or (val is not None and t.patience > 0 and stale >= t.patience)
            state = _snapshot(trainee, epoch, history, best, stale, best_state) if self.keep_state else None
            yield Epoch(epoch, _report(metrics, best, t.monitor, val is not None), stop, state)
            if stop:
                break
        if self.keep_best:
            trainee.model.load_state_dict(best_state)
        final = dict(best)
        final.update(best_epoch=best["epoch"], epochs_run=len(history),
                     mean_epoch_seconds=float(np.mean([h["epoch_seconds"] for h in history])))
        return FitResult(metrics=final, model=trainee.model, cfg=cfg, history=history)


def _run_epoch(trainee: _Trainee, features: Features, train: Split, val: Split | None, epoch: int,
               keep_probs: bool) -> dict:
    """One epoch trained and scored: its metrics (with `probs` where kept)."""
    began = time.perf_counter()
    loss_sum, seen = _train_epoch(trainee, train, epoch)
    metrics = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "lr": trainee.scheduler.get_last_lr()[0],
               "n_params": sum(p.numel() for p in trainee.model.parameters())}
    if val is not None and len(val):
        probs = predict_proba(trainee.evaluated, features, val.rows, trainee.device, precision=trainee.precision)
        metrics.update(classification_metrics(val.labels, probs.argmax(1)))
        if keep_probs:
            metrics["probs"] = probs
    metrics["epoch_seconds"] = time.perf_counter() - began
    if trainee.device.type == "cuda":
        metrics["gpu_peak_mb"] = torch.cuda.max_memory_allocated(trainee.device) / 2**20
        metrics["gpu_reserved_mb"] = torch.cuda.max_memory_reserved(trainee.device) / 2**20
    return metrics


def _report(metrics: dict, best: dict, monitor: str, validated: bool) -> dict:
    """An epoch's metrics as told: no probabilities; the best so far of the monitored metric, and
    the other metric at that epoch."""
    report = {k: v for k, v in metrics.items() if k != "probs"}
    if validated:
        other = "val_macro_f1" if monitor == "val_acc" else "val_acc"
        report[f"best_{monitor}"], report[f"{other}_at_best"] = best[monitor], best[other]
    return report


def fit(cfg: Config, features: Features, train: Split, val: Split | None = None,
        on_epoch: Callable[[int, dict], None] | None = None, progress: bool = False, keep_probs: bool = False,
        keep_best: bool = True) -> FitResult:
    """A Training run to its end (see Training); on_epoch(number, metrics) after every epoch (the
    command lines print them)."""
    training = Training(cfg, features, train, val, progress=progress, keep_probs=keep_probs, keep_best=keep_best)
    for epoch in training:
        if on_epoch is not None:
            on_epoch(epoch.number, epoch.metrics)
    return training.result


def format_epoch(epoch: int, m: dict) -> str:
    parts = [f"epoch {epoch:3d}", f"loss {m['train_loss']:.4f}"]
    if "val_acc" in m:
        parts += [f"val_acc {m['val_acc']:.4f}", f"val_macro_f1 {m['val_macro_f1']:.4f}"]
    parts.append(f"{m['epoch_seconds']:.1f}s")
    if "gpu_peak_mb" in m:
        parts.append(f"gpu peak {m['gpu_peak_mb']:.0f} MiB (reserved {m['gpu_reserved_mb']:.0f})")
    return "  ".join(parts)
