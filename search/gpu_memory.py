"""GPU memory planned before a search's trials start: what one trial holds (mmsa.models.memory,
measured in a child process on the architectures of the space's most demanding trial, no weights
downloaded), against the card (torch's view of this machine's GPU, or --gpu-memory); the
micro-batch (gradient accumulation keeps the searched batch) and, with `resources: {gpu: auto}`,
the trials per GPU; refused in one line where not even one example fits. `--dry-run` prints the
plan (the line starting `plan:`) and runs nothing.

Beside the measured parts, two allowances, taken from the one GPU run measured
(bench/results/gpu_check.md, an H200: 2,096 MiB allocated by torch at its peak, 2,600 reserved by
its caching allocator, 3,381 in nvidia-smi): the caching allocator's rounding and fragments (+24%
over allocated) and what a process's CUDA context and kernels hold outside torch (781 MiB). A
packed trial is held to its share of the card (search.trainable.hold_to_share).

A card is what torch sees of it (`total_memory`), which is less than the size it is sold by:
`--gpu-memory 16GB` means a card sold as 16 GB, planned at the smallest figure torch reports for
the cards sold so (CARDS: a T4's 14.75 GiB); `--gpu-memory 14.7GiB` is that many bytes as
torch reports them; `--gpu-memory T4` names a card.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmsa.errors import UserError
from search.sizes import GIB, split_size

CUDA_CONTEXT = 800 * 2 ** 20  # a process's CUDA context and kernels, outside torch's allocator (781 MiB measured)
ALLOCATOR_SLACK = 1.25  # torch's caching allocator: reserved over allocated (1.24 measured)
MIN_MICRO = 8  # trials share a GPU only where each keeps micro-batches of this size (or its whole batch)


@dataclass(frozen=True)
class Card:
    name: str
    sold_gb: int  # the size it is sold by, decimal GB
    visible_gib: float  # torch.cuda.get_device_properties(0).total_memory, the smallest seen (drivers differ)


# torch's total_memory as its out-of-memory messages report it ("GPU 0 has a total capacity of
# ... GiB"; "... GiB total capacity" before torch 2.1) in public issue threads; drivers move it by
# a few hundredths. The smallest figure where several were seen; docs/scaling.md tables the sources.
CARDS = (
    Card("T4", 16, 14.75),
    Card("L4", 24, 21.96),  # the smallest 24 GB-class figure seen (21.96-22.09); an L4's own not confirmed
    Card("A10G", 24, 22.20),
    Card("RTX-4090", 24, 23.52),
    Card("A100-40GB", 40, 39.39),
    Card("A100-80GB", 80, 79.14),
    Card("H100-80GB", 80, 79.11),
)
VISIBLE_OF_SOLD = 0.97  # a decimal size no card of CARDS is sold by: this much of it (24 GB: 0.98)


def parse_card(text: str, where: str = "--gpu-memory") -> int:
    """Bytes of a card as torch sees it: a card's name (T4), a sold size in decimal units (16GB:
    the smallest of the cards of CARDS sold so), or binary units as torch reports them (14.7GiB)."""
    by_name = {c.name.lower(): c for c in CARDS} | {"a10": CARDS[2]}
    if text.strip().lower() in by_name:
        return int(by_name[text.strip().lower()].visible_gib * GIB)
    parts = split_size(text)
    if parts is None or parts[1] < 2:
        raise UserError(f"{where}: {text!r} is not a card size like 16GB (as sold) or 14.7GiB (as torch reports it), "
                        f"nor a card ({', '.join(c.name for c in CARDS)})")
    number, power, binary = parts
    if binary:
        return int(number * 1024 ** power)
    sold = [c.visible_gib for c in CARDS if power == 3 and c.sold_gb == number]
    return int(min(sold) * GIB) if sold else int(number * 1000 ** power * VISIBLE_OF_SOLD)


def describe_card(card: int) -> str:
    """A card's size in the plan's line: torch's GiB, and the card sold at that size where one is."""
    names = [c.name for c in CARDS if int(c.visible_gib * GIB) == card]
    return f"{card / GIB:.2f} GiB GPU" + (f" ({names[0]})" if names else "")


def memory_fraction(share: float, total: int) -> float:
    """The fraction of a card of `total` bytes that torch's allocator may take in a trial holding
    `share` of it: its share, less what CUDA keeps outside the allocator."""
    return min(1.0, max(0.01, (share * total - CUDA_CONTEXT) / total))


@dataclass(frozen=True)
class GpuFit:
    card: int  # bytes of the card planned for
    trials_per_gpu: int
    micro_batch: int  # examples in memory at once
    batch: int  # the searched batch at most (the effective batch, one optimizer step)
    per_trial: int  # bytes one trial needs at that micro-batch
    parts: str  # where they go
    precision: str

    def line(self) -> str:
        accumulate = f"micro-batch {self.micro_batch} of batch {self.batch}" if self.micro_batch < self.batch \
            else f"whole batches of {self.batch}"
        return (f"plan: {self.per_trial / GIB:.1f} GiB of GPU memory per trial at {accumulate}, {self.precision} "
                f"({self.parts}; CUDA context {CUDA_CONTEXT / 2**20:.0f} MiB, allocator slack "
                f"{ALLOCATOR_SLACK - 1:.0%}); {self.trials_per_gpu} trial(s) per {describe_card(self.card)}")


def need(memory, micro: int) -> int:
    """Bytes one trial holds on its GPU at this micro-batch."""
    return int(memory.total(micro) * ALLOCATOR_SLACK) + CUDA_CONTEXT


def choose(memory, card: int, batch: int, share: float | None, max_concurrent: int, precision: str) -> GpuFit:
    """The micro-batch, and the trials per GPU where `share` is None (resources.gpu: auto): as many
    as fit with micro-batches of at least MIN_MICRO (or the whole batch), up to max_concurrent;
    else each trial gets `share` of the card."""
    def largest_micro(available: int) -> int:
        micro = batch
        while micro > 1 and need(memory, micro) > available:
            micro = (micro + 1) // 2
        return micro if need(memory, micro) <= available else 0

    if share is None:
        floor = min(MIN_MICRO, batch)
        k = max_concurrent
        while k > 1 and largest_micro(card // k) < floor:
            k -= 1
        trials, available = k, card // k
    else:
        trials, available = max(1, int(1 / share)), int(card * share)
    micro = largest_micro(available)
    if micro == 0:
        raise UserError(f"GPU memory: one trial needs {need(memory, 1) / GIB:.1f} GiB even one example at a time "
                        f"({memory.parts(1)}), more than the {available / GIB:.1f} GiB it has of a {card / GIB:.2f} "
                        f"GiB card: lower max_text_len, set grad_checkpointing: true, choose smaller backbones, or "
                        f"give each trial more of the GPU (resources.gpu)")
    return GpuFit(card, trials, micro, batch, need(memory, micro), memory.parts(micro), precision)


def _measure(cfg, half: bool):
    from mmsa.models.memory import measure_training_memory
    return measure_training_memory(cfg, half)


def _visible_card() -> int | None:
    """Bytes of this machine's first GPU, as torch sees it; None without one."""
    import torch
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def choose_for_space(spec, card: int | None) -> GpuFit:
    """The plan of `spec`'s trials on a card of `card` bytes (None: this machine's GPU)."""
    from mmsa.processes import in_child
    if card is None:
        card = in_child(_visible_card)
        if card is None:
            raise UserError("GPU memory: no GPU on this machine to plan for: give the card's size, e.g. "
                            "--gpu-memory 16GB")
    cfg = spec.most_demanding()
    half = cfg.train.precision != "fp32"
    precision = {"auto": "bf16/fp16 (auto)", "fp32": "fp32"}.get(cfg.train.precision, cfg.train.precision)
    memory = in_child(_measure, cfg, half)
    return choose(memory, card, cfg.train.batch_size, None if spec.gpu_auto else spec.gpu, spec.max_concurrent,
                precision)


def applied(spec, chosen: GpuFit):
    """The space with the plan's micro-batch and trials per GPU."""
    from search.space import apply_flags
    if chosen.micro_batch < chosen.batch:
        spec = apply_flags(spec, sets={"micro_batch": chosen.micro_batch})[0]
    if spec.gpu_auto:
        spec = replace(spec, gpu=1 / chosen.trials_per_gpu)
    return spec
