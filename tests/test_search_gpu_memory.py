"""search/gpu_memory.py: the micro-batch and trials per GPU chosen from a trial's measured needs."""

import subprocess
import sys

import pytest

from mmsa.errors import UserError
from search.gpu_memory import ALLOCATOR_SLACK, CARDS, CUDA_CONTEXT, GIB, choose, memory_fraction, need, parse_card
from tests.search_helpers import ROOT


class Memory:
    """A TrainingMemory: 3 GiB fixed, 0.25 GiB per example."""

    def total(self, micro):
        return 3 * GIB + micro * GIB // 4

    def parts(self, micro):
        return f"fixed 3 + {micro / 4:.2f} GiB"


def test_a_trial_gets_its_whole_batch_where_it_fits():
    p = choose(Memory(), 80 * GIB, batch=32, share=1.0, max_concurrent=4, precision="fp16")
    assert (p.trials_per_gpu, p.micro_batch) == (1, 32)
    assert p.per_trial == need(Memory(), 32) == int((3 + 8) * GIB * ALLOCATOR_SLACK) + CUDA_CONTEXT
    assert p.line().startswith("plan: 14.5 GiB of GPU memory per trial at whole batches of 32, fp16")


def test_a_smaller_card_halves_the_micro_batch_and_keeps_the_batch():
    p = choose(Memory(), 8 * GIB, batch=32, share=1.0, max_concurrent=4, precision="fp16")
    assert p.micro_batch == 8 and need(Memory(), 8) <= 8 * GIB < need(Memory(), 16)
    assert "micro-batch 8 of batch 32" in p.line()


def test_auto_packs_trials_onto_a_gpu_while_each_keeps_micro_batches_of_8():
    p = choose(Memory(), 80 * GIB, batch=32, share=None, max_concurrent=8, precision="bf16")
    assert p.trials_per_gpu == 8 and need(Memory(), p.micro_batch) <= 10 * GIB and p.micro_batch >= 8
    assert choose(Memory(), 80 * GIB, 32, None, 2, "bf16").trials_per_gpu == 2  # max_concurrent caps it
    assert choose(Memory(), 10 * GIB, 32, None, 8, "bf16").trials_per_gpu == 1  # two would need micro-batches of 4


def test_what_cannot_fit_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"one trial needs 4.8 GiB even one example at a time") as e:
        choose(Memory(), 3 * GIB, batch=32, share=1.0, max_concurrent=1, precision="fp16")
    assert "\n" not in str(e.value) and "grad_checkpointing" in str(e.value)


def test_the_allowances_cover_the_one_gpu_run_measured():
    """bench/results/gpu_check.md (H200): 2,096 MiB allocated, 2,600 reserved, 3,381 in nvidia-smi."""
    allocated, reserved, smi = 2096 * 2**20, 2600 * 2**20, 3381 * 2**20
    assert allocated * ALLOCATOR_SLACK >= reserved and allocated * ALLOCATOR_SLACK + CUDA_CONTEXT >= smi


def test_a_card_is_what_torch_sees_of_it():
    t4 = int(14.75 * GIB)
    assert parse_card("16GB") == parse_card("T4") == parse_card("16 gb") == t4  # sold as 16 GB: a T4's
    assert parse_card("14.7GiB") == int(14.7 * GIB)  # binary: as torch reports it
    assert parse_card("80GB") == int(min(c.visible_gib for c in CARDS if c.sold_gb == 80) * GIB)
    assert parse_card("48GB") == int(48e9 * 0.97)  # no card of the table: most of its decimal size
    with pytest.raises(UserError, match="--gpu-memory: 'lots' is not a card size"):
        parse_card("lots")


def test_the_sold_size_and_the_real_t4_give_the_same_plan():
    for memory in (Memory(), SmallMemory()):
        a = choose(memory, parse_card("16GB"), batch=32, share=None, max_concurrent=4, precision="fp16")
        b = choose(memory, int(14.76 * GIB), batch=32, share=None, max_concurrent=4, precision="fp16")
        assert (a.trials_per_gpu, a.micro_batch) == (b.trials_per_gpu, b.micro_batch)
    # the decimal reading of 16 GB (14.9 GiB) would pack more than the card holds
    generous = choose(SmallMemory(), int(16e9), batch=32, share=None, max_concurrent=4, precision="fp16")
    assert generous.per_trial * generous.trials_per_gpu > int(14.75 * GIB)


class SmallMemory:
    """A TrainingMemory where 16e9 bytes fit three trials and a T4 two."""

    def total(self, micro):
        return int(3.17 * GIB) + micro * (GIB // 50)

    def parts(self, micro):
        return "small"


def test_a_trials_share_of_the_card_leaves_room_for_its_cuda_context():
    assert memory_fraction(0.5, 16 * GIB) == (8 * GIB - CUDA_CONTEXT) / (16 * GIB)
    assert memory_fraction(1.0, 16 * GIB) < 1 and memory_fraction(0.001, GIB) == 0.01


@pytest.mark.parametrize("card", ["16GB", "80GB"])
def test_dry_run_plans_the_gpu_space_for_a_card_and_records_nothing(tmp_path, card):
    """A RoBERTa-size text model and timm's ConvNeXt-T, built without their weights."""
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(ROOT / "spaces" / "gpu.yaml"),
                          "--dry-run", "--gpu-memory", card, "--set", "precision=fp16",
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    line = out.stdout.strip().splitlines()[-1]
    visible = parse_card(card) / GIB
    assert line.startswith("plan: ") and f"per {visible:.2f} GiB GPU" in line and "fp16" in line
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.iterdir())
