"""Does the GPU memory plan hold on the card? One command, without internet or Ray, sized for a
lent GPU's 15 minutes: spaces/gpu.yaml's most demanding trial planned for this card
(search.gpu_memory), then run as a search runs it (search.trainable.fit_trial: 3 folds of one epoch,
every fold's model built and freed) in processes of its own:

- alone, in fp16, and in bf16 where the card has it natively (a T4 only emulates it);
- two trials packed on the card at once, each held to half of it (set_per_process_memory_fraction);
- one whose first step runs out of memory (injected), retried at half the micro-batch.

With the gpu.yaml backbones built with random weights (RoBERTa-base, ConvNeXt-T: transformers and
timm build them offline; a word-level tokenizer made here stands in for RoBERTa's), on synthetic
pairs of full-length texts (or --data's), images read from the pixel cache. Per
trial: the plan against torch's peak allocated and reserved memory (reset per fold) and what
nvidia-smi shows for its process. Exits 1 where a measured peak exceeds its plan.

It needs no weights; the lexicon scores need vaderSentiment and wordsegment (5 MB of wheels).

    python -m bench.gpu_check                    # on a GPU machine
    python -m bench.gpu_check --cpu              # the same path on the CPU, embedded backbones,
                                                 # plan against the trial's peak host memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from bench.common import ROOT, command_line, reset_peak_memory, resident_memory, table, write_result

MIB = 2 ** 20
WORDS = ["good", "bad", "day", "night", "love", "hate", "city", "rain", "sun", "#happy", "@friend", "really"]
SAMPLED = {"lr": 3e-4, "backbone_lr_scale": 0.1, "pooling": "attention", "class_weights": "none", "dropout": 0.1,
           "augment": 0.3, "weight_decay": 0.01}  # the rest of a trial's values; batch and depth at their largest


def synthetic_data(folder: Path, pairs: int, seed: int = 0) -> Path:
    """A course-layout folder of `pairs` labeled pairs: noise JPEGs of 400 x 300 and texts long enough
    to fill max_text_len (the worst case for memory)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    tags = ["positive", "neutral", "negative"]
    rows = []
    for i in range(pairs + 4):
        guid = str(100000 + i)
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(folder / "data" / f"{guid}.jpg",
                                                                                  quality=90)
        (folder / "data" / f"{guid}.txt").write_text(" ".join(rng.choice(WORDS, 80)))
        rows.append(guid)
    (folder / "train.txt").write_text("guid,tag\n" + "".join(f"{g},{tags[i % 3]}\n" for i, g in enumerate(rows[:pairs])))
    (folder / "test_without_label.txt").write_text("guid,tag\n" + "".join(f"{g},null\n" for g in rows[pairs:]))
    return folder


def trial_config(args, precision: str):
    """gpu.yaml with this check's settings: (its spec, the most demanding trial's config)."""
    from search.space import apply_flags, load_space
    spec = load_space(ROOT / "spaces" / "gpu.yaml")
    sets = {"precision": precision, "device": "cpu" if args.cpu else "cuda", "cache_dir": str(args.work / "cache")}
    if args.backbones == "embedded":
        sets.update(text_encoder="minilm", image_encoder="efficientnet_lite0")
    spec = apply_flags(replace(spec, max_epochs=1, data_dir=str(args.data), cv_folds=args.folds), sets=sets)[0]
    return spec, spec.most_demanding()


def worker(job: dict) -> None:
    """One trial, in this process: job's config on job's data; writes its reports to job["out"]."""
    import functools

    import mmsa.features.encoders as encoders
    if job["random_backbones"]:
        import mmsa.models.finetune as finetune

        @functools.lru_cache(maxsize=1)
        def random_backbones(text: str, image: str):
            return encoders.build_text_encoder(text, pretrained=False), encoders.build_image_encoder(image, pretrained=False)
        finetune._pretrained = random_backbones
        tokenizer = stand_in_tokenizer()
        encoders.load_tokenizer = lambda name: tokenizer
    import torch

    import mmsa.training.fit as fit
    if job["inject_oom"]:
        first_epoch = fit._train_epoch

        def out_of_memory_once(*a, **k):
            fit._train_epoch = first_epoch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by gpu_check)")
        fit._train_epoch = out_of_memory_once
    from mmsa.config import Config
    from mmsa.data.dataset import load_dataset
    from mmsa.data.splits import Split, cv_splits
    from mmsa.features.rawsource import RawSource
    from search.trainable import TrialData, fit_trial
    cfg = Config.from_flat(job["config"])
    dataset = load_dataset(cfg.data.data_dir)
    raw = RawSource(dataset.all_examples, cfg.data, pixel_dir=job["pixel_dir"])
    folds = cv_splits(Split.of(raw, dataset.train), job["folds"], seed=0)
    data = TrialData(guids=raw.guids, text_dir="", image_dir="", folds=folds, base=job["config"],
                     threads=job["threads"], raw=raw, every_epoch=True, gpu_share=job["share"])
    curves, reports = {}, []
    # host memory: what is there before training (libraries, tokenizer, the pairs' text) is not the
    # plan's; from here on the peak counts (VmHWM reset)
    raw.text_dim, raw.image_dim  # noqa: B018 - loads the tokenizer and the image preprocessing
    import timm  # noqa: F401
    import transformers  # noqa: F401
    reset_peak_memory()
    rss_before = resident_memory()

    def emit(report, state) -> None:
        for fold, epochs in report.curves.items():
            curves.setdefault(str(fold), {}).update({str(e): m for e, m in epochs.items()})
        reports.append({"fold": report.fold, "epoch": report.epoch, "micro_batch": report.retry.micro_batch or None,
                        "oom_retries": report.retry.oom_retries or None})

    fit_trial(emit, job["sampled"], data, gpu=not job["cpu"])
    Path(job["out"]).write_text(json.dumps({"curves": curves, "reports": reports, "rss_before": rss_before,
                                            "rss_peak": resident_memory(peak=True)}))


def stand_in_tokenizer():
    """A word-level tokenizer made here, with RoBERTa's special tokens and ids (RoBERTa's own is on
    the hub): the synthetic texts' words, anything else unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


class SmiWatcher:
    """The most memory nvidia-smi shows for each process while it runs (pid -> MiB)."""

    def __init__(self):
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if shutil.which("nvidia-smi"):
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                try:
                    pid, used = (x.strip() for x in line.split(","))
                    self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0.0), float(used))
                except ValueError:
                    pass
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()


def run_pass(name: str, jobs: list[dict], smi: SmiWatcher) -> list[dict]:
    """Run `jobs` at once, each in a process of its own; their results, with nvidia-smi's peak."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    for job in jobs:
        procs.append((job, subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "--worker", json.dumps(job)],
                                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    results = []
    for job, proc in procs:
        output, _ = proc.communicate()
        result = json.loads(Path(job["out"]).read_text()) if proc.returncode == 0 else None
        if result is None:
            print(f"{name}: trial failed ({proc.returncode}):\n{output[-3000:]}", file=sys.stderr, flush=True)
        results.append({"job": job, "result": result, "smi_mib": smi.peaks.get(proc.pid), "log": output})
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--data", help="a course-layout folder (default: synthetic pairs made here)")
    p.add_argument("--pairs", type=int, default=192, help="synthetic labeled pairs (default 192)")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="on the CPU (the path, with the embedded backbones)")
    p.add_argument("--backbones", choices=("gpu-yaml", "embedded"),
                   help="gpu.yaml's RoBERTa-base + ConvNeXt-T with random weights (default on a GPU), or the "
                        "embedded MiniLM + EfficientNet-Lite0 (default on the CPU)")
    p.add_argument("--gpu-memory", default="16GB", help="the card the CPU run plans for (default 16GB)")
    p.add_argument("--out", help="the result's name: bench/results/OUT.md (default gpu_check_plan, or gpu_check_cpu; "
                   "gpu_check.md is the 2026-11-27 H200 run the plan's allowances come from)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import torch

    from mmsa.data.dataset import load_dataset
    from mmsa.features.rawsource import RawSource
    from mmsa.models.memory import measure_training_memory
    from search.gpu_memory import CUDA_CONTEXT, choose, describe_card, parse_card
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (--cpu runs the same path on the CPU)", file=sys.stderr)
        return 2
    args.backbones = args.backbones or ("embedded" if args.cpu else "gpu-yaml")
    args.out = args.out or ("gpu_check_cpu" if args.cpu else "gpu_check_plan")
    args.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.data = Path(args.data).resolve() if args.data else synthetic_data(args.work / "data", args.pairs)
    if args.cpu:
        card, device, precisions = parse_card(args.gpu_memory), "CPU", ["fp32"]
    else:
        props = torch.cuda.get_device_properties(0)
        card, device = props.total_memory, f"{props.name}, {describe_card(props.total_memory)}"
        precisions = ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported(including_emulation=False) else [])
    threads = os.cpu_count() or 1
    smi = SmiWatcher()
    rows, failures, sections = [], 0, []
    pixel_dir = None
    for precision in precisions:
        spec, cfg = trial_config(args, precision)
        if pixel_dir is None:  # decoded once, read by every trial
            pixel_dir = RawSource.from_files(load_dataset(args.data).all_examples, cfg.data).pixel_dir
        memory = measure_training_memory(cfg, precision != "fp32")
        batch = cfg.train.batch_size
        packings = [("alone", 1.0, 1, False)]
        if precision == precisions[-1]:
            packings += ([] if args.cpu else [("two packed", 0.5, 2, False)]) + [("out-of-memory injected", 1.0, 1, True)]
        for name, share, count, inject in packings:
            chosen = choose(memory, card, batch, share, 1, precision)
            flat = cfg.to_flat() | {"micro_batch": chosen.micro_batch if chosen.micro_batch < batch else 0}
            jobs = [{"config": flat, "sampled": SAMPLED, "folds": args.folds, "threads": max(1, threads // count),
                     "share": share,
                     "cpu": args.cpu, "inject_oom": inject, "random_backbones": args.backbones == "gpu-yaml",
                     "pixel_dir": pixel_dir, "out": str(args.work / f"{precision}-{name}-{k}.json".replace(" ", "_"))}
                     for k in range(count)]
            print(f"{precision}, {name}: {chosen.line()}", flush=True)
            sections.append(f"- {precision}, {name}: `{chosen.line()}`")
            for got in run_pass(name, jobs, smi):
                row, bad = describe(got, chosen, memory, args.cpu, inject, CUDA_CONTEXT)
                rows.append([precision, name, *row])
                failures += bad
    smi.stop()
    header = ["precision", "trials", "micro-batch", "plan MiB", "torch peak allocated MiB per fold",
              "reserved MiB (peak)", "nvidia-smi MiB", "s per epoch", "OOM retries", "verdict"]
    if args.cpu:
        header[3:7] = ["plan MiB (host: torch's part + the pretrained copy, + slack)", "-", "-",
                       "peak host memory growth MiB"]
    body = table(header, rows)
    body += "\n\nThe plans printed:\n\n" + "\n".join(sections)
    body += (f"\n\nDevice: {device}. spaces/gpu.yaml's most demanding trial (batch 32, fusion depth 2, max_text_len 64), "
             f"backbones {'RoBERTa-base + ConvNeXt-T with random weights' if args.backbones == 'gpu-yaml' else 'MiniLM + EfficientNet-Lite0'}, "
             f"{args.folds} folds of one epoch on {'synthetic pairs' if 'gpu-check-' in str(args.data) else args.data}. "
             + ("On a GPU, the verdict compares nvidia-smi's figure for the trial's process (or torch's reserved peak "
                f"plus the {CUDA_CONTEXT / MIB:.0f} MiB CUDA context allowed) with the plan's per-trial memory. "
                if not args.cpu else
                "On the CPU there is no card: the verdict compares the trial process's peak host memory growth from "
                "its start of training (libraries and tokenizer loaded) with the plan's torch part (weights, gradients, "
                "AdamW, activations, in fp32) plus the pretrained backbones every fold's model is copied from (on a "
                "GPU those stay in host memory), with the allocator slack and no CUDA context. ")
             + f"{failures} trial(s) over their plan.")
    write_result(args.out, "The GPU memory plan against the card", body, command_line("bench.gpu_check", argv))
    print(f"trials={len(rows)} over_plan={failures}")
    return 1 if failures else 0


def describe(got: dict, chosen, memory, cpu: bool, injected: bool, context: int) -> tuple[list, int]:
    """A trial's row and whether it exceeded its plan (or failed)."""
    from search.gpu_memory import ALLOCATOR_SLACK
    result = got["result"]
    if result is None:
        return [chosen.micro_batch, f"{chosen.per_trial / MIB:.0f}", "failed", "-", "-", "-", "-", "FAILED"], 1
    curves = result["curves"]
    folds = [max((e.get("gpu_peak_mb", 0) for e in curves[k].values()), default=0) for k in sorted(curves, key=int)]
    reserved = max((e.get("gpu_reserved_mb", 0) for f in curves.values() for e in f.values()), default=0)
    seconds = [e["epoch_seconds"] for f in curves.values() for e in f.values()]
    retries = max((r.get("oom_retries") or 0 for r in result["reports"]), default=0)
    micro = next((r["micro_batch"] for r in reversed(result["reports"]) if r.get("micro_batch")), chosen.micro_batch)
    if cpu:  # host memory also holds the pretrained backbones each fold's model is copied from
        planned = int((memory.total(int(micro)) + memory.weights) * ALLOCATOR_SLACK)
        measured = (result["rss_peak"] - result["rss_before"])
        over = measured > planned
        cells = [micro, f"{planned / MIB:.0f}", "-", "-", f"{measured / MIB:.0f}"]
    else:
        planned = chosen.per_trial
        smi = got["smi_mib"]
        measured = smi * MIB if smi else reserved * MIB + context
        over = measured > planned
        cells = [micro, f"{planned / MIB:.0f}", " / ".join(f"{x:.0f}" for x in folds), f"{reserved:.0f}",
                 f"{smi:.0f}" if smi else "-"]
    bad = over or (injected and retries != 1)
    verdict = ("OVER PLAN" if over else "within plan") + ("" if not injected else
                                                          ", retried" if retries == 1 else ", NOT RETRIED")
    return [*cells, f"{sum(seconds) / max(len(seconds), 1):.1f}", retries, verdict], int(bad)


if __name__ == "__main__":
    sys.exit(main())
