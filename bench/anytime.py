"""The anytime curve: the whole pipeline's nested-CV accuracy against the search's time budget.

    python -m bench.anytime --runs 2m=.cache/nested-2m 5m=.cache/nested-5m 10m=.cache/nested-10m [--out anytime]

Each run is a bench.nested_cv work folder of the same outer folds (the same --seed), searched with
that budget and scored with mmsa.final's default (`final_ensemble`). Tables each budget's accuracy
and macro-F1 (mean ± standard error over the outer folds) and its paired difference from the
largest budget, and names the smallest budget within one standard error of that plateau; draws
the curve with its error bars (`--plot`, default docs/anytime_curve.png).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.common import ROOT, command_line, table, write_result


def seconds(budget: str) -> float:
    from search.time_budget import parse_duration
    return parse_duration(budget, "--runs")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.anytime", description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="BUDGET=WORK")
    p.add_argument("--plot", default="docs/anytime_curve.png", help="where the figure goes (default %(default)s)")
    p.add_argument("--out", default="anytime", help="the result's name: bench/results/OUT.md")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        budget, _, folder = spec.partition("=")
        results = json.loads(((ROOT / folder).resolve() / "results.json").read_text())
        runs[budget] = {i: r for i, r in results.items() if "final_ensemble" in r}
    folds = sorted(set.intersection(*(set(r) for r in runs.values())), key=int)
    if not folds:
        raise SystemExit("bench.anytime: the runs share no outer fold")
    budgets = sorted(runs, key=seconds)
    acc = {b: np.array([runs[b][i]["final_ensemble"]["acc"] for i in folds]) for b in budgets}
    f1 = {b: np.array([runs[b][i]["final_ensemble"]["macro_f1"] for i in folds]) for b in budgets}
    top = budgets[-1]

    def se(x):
        return x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0
    rows, chosen = [], None
    for b in budgets:
        diff = (acc[b] - acc[top]) * 100
        within = b == top or abs(diff.mean()) <= se(diff) or diff.mean() >= 0
        if within and chosen is None:
            chosen = b
        minutes = np.mean([runs[b][i]["search_seconds"] + runs[b][i]["final_ensemble"]["seconds"] for i in folds]) / 60
        rows.append([b, f"{acc[b].mean():.4f} ± {se(acc[b]):.4f}", f"{f1[b].mean():.3f} ± {se(f1[b]):.3f}",
                     "" if b == top else f"{diff.mean():+.2f} ± {se(diff):.2f} (below in {int((diff < 0).sum())})",
                     f"{minutes:.1f}"])
    body = table(["budget", "accuracy (mean ± s.e.)", "macro-F1", f"minus {top}, points (± s.e.)",
                  "search + final min per outer fold (4/5 of the pairs)"], rows)
    body += (f"\n\n{len(folds)} outer folds ({', '.join(folds)}), the same for every budget. The smallest budget "
             f"within one standard error of the largest ({top}), paired by outer fold: **{chosen}**.")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [seconds(b) / 60 for b in budgets]
    ax.errorbar(x, [acc[b].mean() for b in budgets], yerr=[se(acc[b]) for b in budgets], marker="o", capsize=4,
                label="search + final (nested CV)")
    probe = np.array([runs[top][i]["probe_lexicon"]["acc"] for i in folds])
    ax.axhline(probe.mean(), color="grey", linestyle="--", label="linear probe with lexicon scores")
    ax.set_xlabel("the search's time budget (minutes)")
    ax.set_ylabel(f"accuracy on the outer folds (mean ± s.e., {len(folds)} folds)")
    ax.set_xticks(x)
    ax.set_title("The anytime curve of the default pipeline")
    ax.legend(loc="lower right")
    fig.tight_layout()
    plot = (ROOT / args.plot).resolve()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=100)
    body += f"\n\nThe figure: `{args.plot}`."
    write_result(args.out, "The anytime curve: accuracy against the search's budget", body,
                 command_line("bench.anytime", argv))


if __name__ == "__main__":
    main()
