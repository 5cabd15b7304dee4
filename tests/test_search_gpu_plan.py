"""search/gpu_plan.py: the micro-batch and trials per GPU chosen from a trial's measured needs."""

import subprocess
import sys

import pytest

from mmsa.errors import UserError
from search.gpu_plan import ALLOCATOR_SLACK, CUDA_CONTEXT, GIB, need, plan
from tests.search_helpers import ROOT


class Memory:
    """A TrainingMemory: 3 GiB fixed, 0.25 GiB per example."""

    def total(self, micro):
        return 3 * GIB + micro * GIB // 4

    def parts(self, micro):
        return f"fixed 3 + {micro / 4:.2f} GiB"


def test_a_trial_gets_its_whole_batch_where_it_fits():
    p = plan(Memory(), 80 * GIB, batch=32, share=1.0, max_concurrent=4, precision="fp16")
    assert (p.trials_per_gpu, p.micro_batch) == (1, 32)
    assert p.per_trial == need(Memory(), 32) == int((3 + 8) * GIB * ALLOCATOR_SLACK) + CUDA_CONTEXT
    assert p.line().startswith("plan: 12.6 GiB of GPU memory per trial at whole batches of 32, fp16")


def test_a_smaller_card_halves_the_micro_batch_and_keeps_the_batch():
    p = plan(Memory(), 8 * GIB, batch=32, share=1.0, max_concurrent=4, precision="fp16")
    assert p.micro_batch == 8 and need(Memory(), 8) <= 8 * GIB < need(Memory(), 16)
    assert "micro-batch 8 of batch 32" in p.line()


def test_auto_packs_trials_onto_a_gpu_while_each_keeps_micro_batches_of_8():
    p = plan(Memory(), 80 * GIB, batch=32, share=None, max_concurrent=8, precision="bf16")
    assert p.trials_per_gpu == 8 and need(Memory(), p.micro_batch) <= 10 * GIB and p.micro_batch >= 8
    assert plan(Memory(), 80 * GIB, 32, None, 2, "bf16").trials_per_gpu == 2  # max_concurrent caps it
    assert plan(Memory(), 10 * GIB, 32, None, 8, "bf16").trials_per_gpu == 1  # two would need micro-batches of 4


def test_what_cannot_fit_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"one trial needs 4.1 GiB even one example at a time") as e:
        plan(Memory(), 3 * GIB, batch=32, share=1.0, max_concurrent=1, precision="fp16")
    assert "\n" not in str(e.value) and "grad_checkpointing" in str(e.value)


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
    assert line.startswith("plan: ") and f"per {card[:-2]} GiB GPU" in line and "fp16" in line
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.iterdir())
