"""Where and how models run: the device, CUDA mixed precision, and class probabilities of rows
of features in small batches (what validation, the final model and the predictor all use)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from mmsa.data.dataset import LABELS
from mmsa.features.featureset import Features
from mmsa.models.heads import Head, with_image_grid


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# What CUDA's libraries say when they cannot allocate: torch's own allocator raises
# OutOfMemoryError, but cuBLAS and cuDNN failing to allocate their workspaces raise plain
# RuntimeErrors (and cuDNN's "not supported" is what an oversized convolution meets; accelerate's
# find_executable_batch_size retries it too).
OUT_OF_MEMORY_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                          "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the GPU running out of memory, in any of the forms CUDA's libraries raise."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OUT_OF_MEMORY_MESSAGES)


def release_device_memory() -> None:
    """Give the blocks torch's caching allocator holds back to the card, once nothing references them
    (after an out-of-memory: the failed step's tensors die with its traceback, which must be gone first)."""
    import gc
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def for_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` on `device`, laid out for it: on CUDA, a fine-tuned CNN's weights in channels_last
    (tensor cores under autocast read NHWC; its pixels arrive so too, mmsa.features.rawsource), and
    cuDNN picks its fastest convolution per input shape (the images' shape never changes)."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        channels_last(model)
    return model


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """The image backbone of a fully fine-tuned model (if any) in channels_last memory format."""
    backbone = getattr(model, "image_backbone", None)
    if backbone is not None:
        backbone.to(memory_format=torch.channels_last)
    return model


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype, None for float32. auto: on CUDA, bf16 where the card has it natively
    (Ampere and later), else fp16 (trained with a gradient scaler: fp16 gradients underflow); a
    T4 reports bf16 as supported only through emulation, slower than fp16. float32 on a CPU."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, precision: str = "auto"):
    dtype = amp_dtype(device, precision)
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def predict_proba(model: torch.nn.Module, features: Features, rows: np.ndarray, device: torch.device,
                  batch_size: int = 64, precision: str = "auto") -> np.ndarray:
    """Class probabilities of one model for `rows` (predict_proba_each)."""
    return predict_proba_each([model], features, rows, device, batch_size, [precision])[0]


@torch.no_grad()
def predict_proba_each(models: list[torch.nn.Module], features: Features, rows: np.ndarray, device: torch.device,
                       batch_size: int = 64, precisions: list[str] | None = None) -> list[np.ndarray]:
    """Class probabilities of each model (on `device`) for `rows`, in small batches, each batch made
    once and read by every model: larger ones raise a trial's peak memory (float32 text tokens and
    the image grid per example) and are no faster on a CPU. Batches hold neighbouring rows of the
    cache, or, where text layers run, texts of similar length (each batch is padded to its longest
    text only)."""
    precisions = precisions or ["auto"] * len(models)
    for model in models:
        if model.training:
            model.eval()
    out = [np.zeros((len(rows), len(LABELS)), dtype=np.float32) for _ in models]
    if any(getattr(getattr(m, "cfg", None), "text_layers", 0) > 0 for m in models):  # last_k: batch by length
        order = np.argsort(features.text_lengths(rows), kind="stable")
    else:
        order = np.argsort(rows)
    chunks = [order[s:s + batch_size] for s in range(0, len(rows), batch_size)]
    grids = [model.cfg.image_grid if isinstance(model, Head) else None for model in models]
    for idx, inputs in zip(chunks, features.iter_batches([rows[idx] for idx in chunks], device)):
        shared = {}  # (image_grid, precision) -> the batch as the heads of that grid read it
        for model, grid, precision, probs in zip(models, grids, precisions, out):
            with autocast(device, precision):
                args = inputs
                if grid is not None:  # the many heads of a served ensemble average the grid once
                    if (grid, precision) not in shared:
                        shared[grid, precision] = with_image_grid(inputs, grid)
                    args = shared[grid, precision]
                logits = model(*args)
            probs[idx] = logits.float().softmax(-1).cpu().numpy()
    return out


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model moved to `device` unless it is there already (a move walks every parameter)."""
    param = next(model.parameters(), None)
    if param is None or (param.device.type == device.type and device.index in (None, param.device.index)):
        return model
    return model.to(device)
