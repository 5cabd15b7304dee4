"""The GPU path measured on a GPU machine, in one command sized for about 10 minutes and no internet:
`spaces/gpu.yaml` with the embedded backbones standing in for the hub's (MiniLM, EfficientNet-Lite0;
`--text-encoder` / `--image-encoder` name others whose weights are at hand), searched for a few
minutes once per precision (fp16, bf16), then `mmsa.final --register` and `mmsa.predict` on the
first search. Reports the memory plan against what the trials held (torch's peak), seconds per
epoch, the trials' scores against the probe, and final's and predict's times.

    python -m bench.gpu_check --data ../shared/mvsa [--minutes 3] [--precisions fp16 bf16] [--out gpu_check]

`--cpu` runs the same on the CPU (no GPU reserved), to try the bench itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, command_line, table, write_result


def run(cmd: list[str], env: dict) -> tuple[str, float]:
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout, time.time() - start


def trials_of(uri: str, parent: str) -> list[dict]:
    """Each trial of a search: its score, folds, device, seconds per epoch and peak GPU memory."""
    from mlflow.tracking import MlflowClient

    from search.tracking import child_runs
    client = MlflowClient(uri)
    rows = []
    for run in child_runs(client, client.get_run(parent).info.experiment_id, parent):
        m = run.data.metrics
        seconds = [x.value for k in m if k.endswith("_epoch_seconds") for x in client.get_metric_history(run.info.run_id, k)]
        peaks = [x.value for k in m if k.endswith("_gpu_peak_mb") for x in client.get_metric_history(run.info.run_id, k)]
        rows.append({"trial": run.data.tags.get("mmsa.trial_id"), "ended": run.data.tags.get("mmsa.ended"),
                     "score": m.get("best_val_acc"), "folds": m.get("folds_done", 0),
                     "epoch_s": sum(seconds) / len(seconds) if seconds else None,
                     "peak_mib": max(peaks) if peaks else None, "micro_batch": run.data.params.get("micro_batch"),
                     "batch": run.data.params.get("batch_size"), "device": run.data.tags.get("mmsa.device")})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/mvsa")
    p.add_argument("--minutes", type=float, default=3, help="each search's time budget (default 3)")
    p.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=("fp16", "bf16", "fp32"))
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--image-encoder", default="efficientnet_lite0")
    p.add_argument("--num-samples", type=int, default=40)
    p.add_argument("--max-epochs", type=int, help="each fold's epochs (spaces/gpu.yaml's otherwise)")
    p.add_argument("--cpu", action="store_true", help="on the CPU, no GPU reserved (to try the bench itself)")
    p.add_argument("--out", default="gpu_check", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.cpu:
        device, gpu_flags = "CPU (no GPU reserved)", ["--gpus-per-trial", "0", "--cpus-per-trial", "1"]
    else:
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible to torch (--cpu runs it on the CPU)", file=sys.stderr)
            return 2
        props = torch.cuda.get_device_properties(0)
        device, gpu_flags = f"{props.name}, {props.total_memory / 2**30:.0f} GiB", []
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    uri = f"sqlite:///{work}/mlflow.db"
    stand_ins = ["--set", f"text_encoder={args.text_encoder}", "--set", f"image_encoder={args.image_encoder}"]
    space = ["--space", "spaces/gpu.yaml", "--data", args.data, *stand_ins, *gpu_flags]
    if args.max_epochs:
        space += ["--max-epochs", str(args.max_epochs)]
    rows, parents, plans = [], {}, []
    for precision in args.precisions:
        out, seconds = run([sys.executable, "-m", "search.run", *space, "--set", f"precision={precision}",
                            "--time-budget", f"{args.minutes}m", "--num-samples", str(args.num_samples),
                            "--tracking-uri", uri, "--storage", str(work / "ray")], env)
        parents[precision] = out.strip().splitlines()[-1].split("=", 1)[1]
        probe = next((ln for ln in out.splitlines() if ln.startswith("baseline:")), "")
        plan_line = next((ln for ln in out.splitlines() if ln.startswith("plan:")), "plan: none (no GPU reserved)")
        for t in trials_of(uri, parents[precision]):
            rows.append([precision, t["trial"], t["ended"], f"{t['folds']:.0f}",
                         f"{t['score']:.4f}" if t["score"] is not None else "-",
                         f"{t['epoch_s']:.1f}" if t["epoch_s"] else "-",
                         f"{t['peak_mib']:.0f}" if t["peak_mib"] else "-", t["batch"],
                         t["micro_batch"] if t["micro_batch"] not in (None, "0") else "whole"])
        rows.append([precision, "search", f"{seconds / 60:.1f} min wall", "", probe.split(": ", 1)[-1], "", "", "", ""])
        plans.append(f"{precision}: {plan_line}")
    first = parents[args.precisions[0]]
    pred, final_s = run([sys.executable, "-m", "mmsa.final", "--run-id", first, "--data", args.data,
                         "--tracking-uri", uri, "--out", str(work / "final.txt"), "--register", "gpu-check"], env)
    again, predict_s = run([sys.executable, "-m", "mmsa.predict", "--model", "models:/gpu-check/1", "--data", args.data,
                            "--tracking-uri", uri, "--out", str(work / "predict.txt")], env)
    same = (work / "final.txt").read_text() == (work / "predict.txt").read_text()
    body = table(["precision", "trial", "ended", "folds", "cv val_acc", "s per epoch", "GPU peak MiB (torch)",
                  "batch", "micro-batch"], rows)
    body += "\n\nThe memory plans the searches printed (against the trials' torch peaks above):\n\n" + "\n".join(
        f"- {line}" for line in plans)
    body += (f"\n\nDevice: {device}. Backbones {args.text_encoder} + {args.image_encoder}, fine-tuned end to end "
             f"(spaces/gpu.yaml otherwise), {args.minutes:g}-minute budget per search. `mmsa.final --register` of the "
             f"{args.precisions[0]} search: {final_s / 60:.1f} min ({pred.strip().splitlines()[-3][:120]}); "
             f"`mmsa.predict`: {predict_s:.0f} s, predictions {'identical to' if same else 'DIFFERENT from'} "
             f"final's. Records: {work}.")
    write_result(args.out, "The GPU path, measured", body, command_line("bench.gpu_check", argv))
    print(json.dumps({"final_s": final_s, "predict_s": predict_s, "same": same}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
