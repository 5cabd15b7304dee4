"""ASHA versus no early stopping (FIFO): the same space, trials and seed; epochs trained, wall
time and best validation accuracy found, with the ratios.

    python bench/early_stopping.py --data ../shared/mvsa [--space spaces/fusion.yaml] [--num-samples N]

By default both searches run as many trials as the space file asks for (40 for the default space).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from bench.common import run_search, table, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--space", default="spaces/fusion.yaml")
    p.add_argument("--num-samples", type=int, help="trials per search (default: the space file's num_samples)")
    args = p.parse_args()

    if args.num_samples is None:
        args.num_samples = int(yaml.safe_load(Path(args.space).read_text()).get("num_samples", 20))
    tmp = Path(tempfile.mkdtemp(prefix="mmsa-bench-es-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    outcome = {}
    for scheduler in ("asha", "fifo"):
        space = yaml.safe_load(Path(args.space).read_text())
        space.setdefault("scheduler", {})["type"] = scheduler
        path = tmp / f"{scheduler}.yaml"
        path.write_text(yaml.safe_dump(space))
        print(f"running the {scheduler} search ({args.num_samples} trials)...", flush=True)
        parent, wall, _ = run_search(path, uri, tmp / "ray", "--data", args.data, "--num-samples",
                                     str(args.num_samples), "--experiment", f"bench-{scheduler}")
        m = MlflowClient(uri).get_run(parent).data.metrics
        outcome[scheduler] = dict(epochs=m["epochs_trained"], wall=wall, best=m["best_val_acc"],
                                  f1=m.get("best_trial_val_macro_f1", float("nan")), parent=parent)
    a, f = outcome["asha"], outcome["fifo"]
    rows = [[name, int(o["epochs"]), f"{o['wall'] / 60:.1f}", f"{o['best']:.4f}", f"{o['f1']:.4f}"]
            for name, o in (("ASHA", a), ("FIFO (no early stopping)", f))]
    rows.append(["ASHA / FIFO", f"{a['epochs'] / f['epochs']:.2f}", f"{a['wall'] / f['wall']:.2f}",
                 f"{a['best'] - f['best']:+.4f} (difference)", ""])
    body = (f"Space `{args.space}`, {args.num_samples} trials each, same searcher seed; wall time includes "
            f"Ray start-up (the feature cache already built).\n\n"
            + table(["search", "epochs trained", "wall (min)", "best val_acc", "its val macro-F1"], rows))
    write_result("early_stopping", "Early stopping: ASHA vs FIFO", body,
                 "python bench/early_stopping.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
