import os
import signal
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from mmsa.app.run_tags import TAG_ENDED, TAG_KIND, TAG_STATE, TAG_TRIAL
from tests.search_helpers import ROOT, TrialHold, child_runs, run_search, search_cmd, wait_until, write_space

pytestmark = pytest.mark.slow  # real searches in subprocesses


def _probe_on_the_search_folds(subset_prepared, cv_folds: int) -> dict:
    """The linear probe on the folds a search of the subset cuts (all labeled pairs, split seed 0),
    reading the lexicon scores as the search's default config does."""
    from mmsa.config import ModelConfig
    from mmsa.features.prepare import prepare
    from mmsa.data.splits import cv_splits
    from mmsa.models.probe import probe_cv
    cfg, _ = subset_prepared
    data = prepare(cfg, val_fraction=0.0)
    return probe_cv(data.features, cv_splits(data.train, cv_folds, cfg.split_seed, cfg.val_fraction),
                    lexicon=ModelConfig().lexicon)


def test_smoke_search_is_recorded_in_mlflow(smoke_search, subset_prepared):
    tmp, uri, parent_id, out = smoke_search
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.data.tags[TAG_KIND] == "search" and parent.data.tags[TAG_STATE] == "finished"
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"best_config.yaml", "space", "plots", "data_report.json"} <= artifacts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(parent_id, "plots"))
    assert f"next: python -m mmsa.final --run-id {parent_id}" in out.stdout  # what to run next

    children = child_runs(client, parent.info.experiment_id, parent_id)
    assert len(children) == 4 and len({c.data.tags[TAG_TRIAL] for c in children}) == 4
    for child in children:
        assert child.data.tags[TAG_ENDED] in ("completed", "stopped early")
        assert child.data.params["d_model"] == "32" and "lr" in child.data.params
        # one report per fold (step = folds done), each fold's curve per epoch
        folds = [m.step for m in client.get_metric_history(child.info.run_id, "best_val_acc")]
        assert folds == list(range(1, len(folds) + 1)) and 1 <= len(folds) <= 3
        assert len(folds) == 3 if child.data.tags[TAG_ENDED] == "completed" else len(folds) < 3
        for k in folds:
            assert [m.step for m in client.get_metric_history(child.info.run_id, f"fold{k}_val_acc")] == [1, 2]
        m = child.data.metrics
        assert m["folds_done"] == len(folds) and m["epochs_trained"] == 2 * len(folds) and m["best_epoch"] in (1, 2)
        # the score is the mean over the folds done, at the one best epoch of their mean curve
        at_best = [client.get_metric_history(child.info.run_id, f"fold{k}_val_acc")[int(m["best_epoch"]) - 1].value
                   for k in folds]
        assert m["best_val_acc"] == pytest.approx(sum(at_best) / len(at_best))
    completed = [c for c in children if c.data.tags[TAG_ENDED] == "completed"]
    assert completed and parent.data.metrics["best_val_acc"] == max(c.data.metrics["best_val_acc"] for c in completed)
    assert "top trials" in out.stdout and "rank" in out.stdout
    # the yardstick: the linear probe on the same folds
    probe = _probe_on_the_search_folds(subset_prepared, cv_folds=3)
    assert parent.data.metrics["probe_val_acc"] == pytest.approx(probe["probe_val_acc"])
    assert parent.data.metrics["probe_val_macro_f1"] == pytest.approx(probe["probe_val_macro_f1"])
    assert "baseline: linear probe on the same folds: val_acc" in out.stdout
    assert parent.data.params["cv_folds"] == "3"
    # what the search cost: folds and epochs against running every trial to the end, and trial time summed
    folds_trained = sum(int(c.data.metrics["folds_done"]) for c in children)
    seconds = sum((c.info.end_time - c.info.start_time) / 1000 for c in children)
    assert parent.data.metrics["folds_trained"] == folds_trained and parent.data.metrics["folds_without_early_stopping"] == 12
    assert parent.data.metrics["epochs_trained"] == 2 * folds_trained
    assert parent.data.metrics["epochs_without_early_stopping"] == 24
    assert 0 < parent.data.metrics["trial_seconds"] == pytest.approx(seconds)
    assert f"cost: {folds_trained} folds ({2 * folds_trained} epochs) trained, of 12 (24)" in out.stdout


def test_the_search_keeps_out_of_fold_predictions_and_selects_an_ensemble(smoke_search, tmp_path):
    import json
    from pathlib import Path

    import numpy as np

    from mmsa.training import oof
    from mmsa.training.plan import Plan
    from mmsa.training.selection import blend, score
    from dataclasses import replace

    from mmsa.app.final import run_member
    tmp, uri, parent_id, out = smoke_search
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)

    def fold_mean_acc(arrays):  # what a trial's score is: the mean over folds of each fold's accuracy
        return np.mean([score("val_acc", arrays["labels"][arrays["fold"] == k], arrays["probs"][arrays["fold"] == k])
                        for k in np.unique(arrays["fold"])])
    probe = oof.load(client.download_artifacts(parent_id, "probe_oof.npz", str(tmp_path)))
    assert str(len(probe["rows"])) == parent.data.params["n_labeled"]
    assert sorted(probe["rows"]) == list(probe["rows"]) and np.unique(probe["fold"]).tolist() == [0, 1, 2]
    assert fold_mean_acc(probe) == pytest.approx(parent.data.metrics["probe_val_acc"])
    candidates = {"probe": probe["probs"]}
    for child in child_runs(client, parent.info.experiment_id, parent_id):
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        if child.data.tags[TAG_ENDED] != "completed":
            assert "oof.npz" not in names  # a trial stopped early has no prediction for every pair
            continue
        got = oof.load(client.download_artifacts(child.info.run_id, "oof.npz", str(tmp_path / child.info.run_id)))
        assert oof.same_rows(got, probe) and np.array_equal(got["fold"], probe["fold"])
        # its predictions at its best epoch are what its score was measured on
        assert fold_mean_acc(got) == pytest.approx(child.data.metrics["best_val_acc"])
        candidates[child.data.tags[TAG_TRIAL]] = got["probs"]
    plan = Plan.from_dict(json.loads(Path(client.download_artifacts(parent_id, "plan.json", str(tmp_path))).read_text()))
    weights = {"probe" if m.kind == "probe" else m.name.removeprefix("trial "): m.weight for m in plan.members}
    assert sum(weights.values()) == pytest.approx(1.0) and set(weights) <= set(candidates)
    for m in plan.members:  # each trial member: its run's whole config, for the epoch its folds peaked at
        if m.kind == "model":
            run = client.get_run(m.source)
            assert m.epochs == run.data.metrics["best_epoch"] and m.seeds == 5
            assert m == replace(run_member(client, run), weight=m.weight)  # final's own reading of a trial run
    assert parent.data.metrics["ensemble_candidates"] == len(candidates)
    blended = score("val_acc", probe["labels"], blend(candidates, weights))
    assert parent.data.metrics["ensemble_val_acc"] == pytest.approx(blended)
    assert blended >= max(score("val_acc", probe["labels"], p) for p in candidates.values())
    assert "ensemble: " in out.stdout and "chosen without each fold in turn" in out.stdout


def test_the_search_driver_holds_no_torch(smoke_search):
    # the driver runs for the whole search: torch there costs memory, and torch loaded late (Ray's
    # TensorBoard logger imports it) once died loading its MKL in a submitted job
    tmp = smoke_search[0]
    modules = (tmp / "driver_modules.txt").read_text().split()
    assert "ray.tune" in modules and "mlflow" in modules  # the driver's own file, written at its end
    assert "torch" not in modules and "tensorboardX" not in modules


def test_smoke_search_records_what_a_user_needs_in_the_ui(smoke_search, subset_dir):
    tmp, uri, parent_id, _ = smoke_search
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    # the UI opens the experiment on its training runs, not on the GenAI overview
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    children = child_runs(client, parent.info.experiment_id, parent_id)
    for run in [parent, *children]:
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]  # MLflow's context tags
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "validation"}  # every labeled pair, in folds
        assert {d.source_type for d in inputs.values()} == {"local"} and str(subset_dir) in inputs["train"].source
        assert inputs["train"].digest == inputs["validation"].digest  # 3 folds: both are all labeled pairs
    assert len({i.dataset.digest for r in [parent, *children] for i in r.inputs.dataset_inputs}) == 1
    for child in children:
        assert not {"pid", "timestamp", "time_this_iter_s", "time_total_s", "iterations_since_restore",
                    "training_iteration", "done"} & set(child.data.metrics)  # Ray's bookkeeping is not a result
        assert "best_val_acc" in child.data.metrics
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"confusion_matrix.png", "confusion_matrix.json"} <= artifacts


def _start_long_search(tmp_path, subset_dir, subset_cache, epochs: int = 40, **popen):
    """A 5-trial search, returned while its third trial is held alive (tests/trial_hooks), recorded
    as running, and after Ray has saved the first two as finished: a kill then lands mid-search
    with a trial running, by construction. Returns (space, uri, process, hold)."""
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=5, cv_folds=1,
                        max_epochs=epochs, max_concurrent=1, scheduler={"type": "fifo", "max_epochs": epochs},
                        time_budget="10m")
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    experiment_id = MlflowClient(uri).create_experiment("mmsa-search")  # db ready before two processes use it
    hold = TrialHold(tmp_path / "hold", nth=3)
    proc = subprocess.Popen(search_cmd(space, tmp_path), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=hold.env(), **popen)
    hold.wait_held(proc)

    def recorded():
        runs = MlflowClient(uri).search_runs([experiment_id], f"tags.`{TAG_KIND}` = 'trial'")
        return sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED", "RUNNING"]
    wait_until(recorded, 120, "two trials finished and the third running, in MLflow", proc)
    wait_until(lambda: _ray_saved_finished(tmp_path / "ray_results") == 2, 120,
               "Ray's saved search state holds the two finished trials", proc)
    return space, uri, proc, hold


def _ray_saved_finished(storage) -> int:
    """How many trials Ray's newest saved search state (what --resume reads) holds as finished."""
    import json
    states = sorted(storage.glob("search-*/experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (ValueError, OSError):  # being written right now
        return 0
    return sum(json.loads(state)["status"] == "TERMINATED" for state, _ in trials)


def _finished_trials(client, parent_id) -> dict[str, str]:
    experiment_id = client.get_run(parent_id).info.experiment_id
    return {r.data.tags[TAG_TRIAL]: r.info.run_id for r in child_runs(client, experiment_id, parent_id)
            if r.info.status == "FINISHED"}


def _resume_and_check(space, tmp_path, client, parent_id, finished_before: dict[str, str]) -> list:
    out = run_search(space, tmp_path, "--resume")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"parent_run_id={parent_id}"  # the same parent run
    parent = client.get_run(parent_id)
    assert parent.data.tags[TAG_STATE] == "finished"
    children = child_runs(client, parent.info.experiment_id, parent_id)
    done = [c for c in children if c.info.status == "FINISHED"]
    assert len({c.data.tags[TAG_TRIAL] for c in done}) == len(done) == 5  # every trial once
    for trial_id, run_id in finished_before.items():  # finished before the kill: kept, not rerun
        assert [c.info.run_id for c in done if c.data.tags[TAG_TRIAL] == trial_id] == [run_id]
    searches = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_KIND}` = 'search'")
    assert len(searches) == 1
    # every trial's out-of-fold predictions, those of the trials before the kill too, are candidates
    assert parent.data.metrics["ensemble_candidates"] == 5 + 1  # none skipped
    # the time budget went on from what was left: at least the finished trials' run times are spent
    ran = sum((c.info.end_time - c.info.start_time) / 1000 for c in done)
    assert 0 < parent.data.metrics["time_budget_left_s"] <= 600 - ran + 3
    return children


def test_interrupted_search_resumes_without_losing_or_repeating_trials(subset_dir, subset_cache, subset_prepared,
                                                                       tmp_path):
    space, uri, proc, hold = _start_long_search(tmp_path, subset_dir, subset_cache)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    hold.release()
    assert proc.returncode == 130, output[-3000:]
    parent_id = output.strip().splitlines()[-1].split("=", 1)[1]
    client = MlflowClient(uri)
    assert client.get_run(parent_id).data.tags[TAG_STATE] == "interrupted"
    _resume_and_check(space, tmp_path, client, parent_id, _finished_trials(client, parent_id))


def test_search_killed_outright_resumes_and_closes_the_trial_it_left_running(
        subset_dir, subset_cache, subset_prepared, tmp_path):
    # SIGKILL to the whole process group (driver, Ray, trials): nothing gets to clean up.
    space, uri, proc, hold = _start_long_search(tmp_path, subset_dir, subset_cache, start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    hold.release()
    client = MlflowClient(uri)
    (search,) = client.search_runs([client.get_experiment_by_name("mmsa-search").experiment_id],
                                   f"tags.`{TAG_KIND}` = 'search'")
    parent_id = search.info.run_id
    left_running = {r.data.tags[TAG_TRIAL] for r in child_runs(client, search.info.experiment_id, parent_id)
                    if r.info.status == "RUNNING"}
    assert left_running, "the kill should have caught a trial mid-training"
    children = _resume_and_check(space, tmp_path, client, parent_id, _finished_trials(client, parent_id))
    closed = [c for c in children if c.data.tags[TAG_TRIAL] in left_running and c.info.status != "FINISHED"]
    assert closed and all(c.info.status == "KILLED" and c.data.tags[TAG_ENDED] == "interrupted" for c in closed)
    assert not [c for c in children if c.info.status == "RUNNING"]


def test_resume_with_nothing_to_resume(subset_dir, subset_cache, tmp_path):
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache))
    out = run_search(space, tmp_path, "--resume", timeout=120)
    assert out.returncode == 2 and "no unfinished search" in out.stderr


def test_failing_trials_are_recorded_and_the_search_goes_on(subset_dir, subset_cache, subset_prepared, tmp_path):
    # lr=1e10 makes the loss blow up (TrainingError inside the trial); lr=1e-3 trains fine.
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=5, max_epochs=1,
                        searcher={"type": "random"}, max_failures=1)
    import yaml
    spec = yaml.safe_load(space.read_text())
    spec["params"] = {"lr": {"type": "choice", "values": [1.0e-3, 1.0e10]}}
    space.write_text(yaml.safe_dump(spec))
    out = run_search(space, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parent_id = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    children = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
    failed = [c for c in children if c.info.status == "FAILED"]
    ok = [c for c in children if c.info.status == "FINISHED"]
    assert len({c.data.tags[TAG_TRIAL] for c in children}) == 5 and failed and ok
    for c in failed:
        assert c.data.tags[TAG_ENDED] in ("failed", "failed (retried)") and c.data.params["lr"] == "10000000000.0"
        assert "loss became" in c.data.tags["mmsa.error"].splitlines()[0]
    for trial_id in {c.data.tags[TAG_TRIAL] for c in failed}:  # max_failures=1: two attempts, both recorded
        attempts = sorted(c.data.tags[TAG_ENDED] for c in failed if c.data.tags[TAG_TRIAL] == trial_id)
        assert attempts == ["failed", "failed (retried)"]
    assert all(c.data.params["lr"] == "0.001" for c in ok)
    assert "FAILED" in out.stdout


def test_full_finetuning_search_trains_the_backbones_in_its_trials(subset_dir, tmp_path):
    """finetune=full: each trial reads the files and trains both backbones; the frozen features are
    cached for the linear probe alone, the yardstick of every search."""
    space = write_space(tmp_path / "full.yaml", str(subset_dir), str(tmp_path / "cache"), num_samples=2,
                        max_epochs=1, cv_folds=1, scheduler={"type": "fifo", "max_epochs": 1}, searcher={"type": "random"})
    import yaml
    spec = yaml.safe_load(space.read_text())
    spec["fixed"].update(finetune="full", max_text_len=16, batch_size=32)
    spec["params"] = {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-4}}
    space.write_text(yaml.safe_dump(spec))
    out = run_search(space, tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finetune=full trials read the pairs themselves" in out.stdout and "baseline: linear probe" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parent_id = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    children = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)
    assert len(children) == 2
    for child in children:
        assert child.data.tags[TAG_ENDED] == "completed" and child.data.params["finetune"] == "full"
        m = child.data.metrics
        at_best = client.get_metric_history(child.info.run_id, "fold1_val_acc")[int(m["best_epoch"]) - 1].value
        assert m["val_acc"] == m["best_val_acc"] == pytest.approx(at_best) and m["mean_epoch_seconds"] > 0



def test_a_search_for_macro_f1_monitors_scores_and_picks_by_macro_f1(subset_dir, subset_cache, subset_prepared,
                                                                      tmp_path):
    from mmsa.app.run_tags import TAG_BEST_RUN
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=3, max_epochs=2,
                        cv_folds=2, metric="val_macro_f1", scheduler={"type": "fifo", "max_epochs": 2})
    out = run_search(space, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parent_id = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    parent = client.get_run(parent_id)
    children = child_runs(client, parent.info.experiment_id, parent_id)
    assert len(children) == 3 and all(c.data.params["monitor"] == "val_macro_f1" for c in children)
    scores = {c.info.run_id: c.data.metrics["best_val_macro_f1"] for c in children}
    assert parent.data.tags[TAG_BEST_RUN] == max(scores, key=scores.get)
    assert parent.data.metrics["best_val_macro_f1"] == max(scores.values())
    assert "cv_val_macro_f1" in out.stdout and f"cv_val_macro_f1 {max(scores.values()):.4f}" in out.stdout


def test_a_time_budget_ends_the_search_and_fine_tuning_trials_read_their_own_cache(subset_dir, subset_cache, tmp_path):
    """A space searching fine-tuning (finetune none | last_k) under a 1-minute budget: more trials
    than fit in it, each short."""
    space = write_space(tmp_path / "space.yaml", str(subset_dir), str(subset_cache), num_samples=200, max_epochs=2,
                        time_budget="1m")
    import yaml
    text = yaml.safe_load(space.read_text())
    text["params"]["finetune"] = {"type": "choice", "values": ["none", "last_k"]}
    text["fixed"]["text_finetune_layers"] = 1
    space.write_text(yaml.safe_dump(text))
    out = run_search(space, tmp_path, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "caching the text features of finetune=last_k (1 text layers train)" in out.stdout
    assert "time budget 1 min 0 s: spent;" in out.stdout and "search interrupted" not in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    parent_id = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    parent = client.get_run(parent_id)
    assert parent.data.tags[TAG_STATE] == "finished" and parent.data.params["time_budget"] == "1m"
    assert parent.data.metrics["time_budget_left_s"] == 0 and parent.data.metrics["time_budget_s"] == 60
    trials = child_runs(client, parent.info.experiment_id, parent_id)
    assert 2 < len(trials) < 200
    assert {t.data.tags[TAG_ENDED] for t in trials} <= {"completed", "stopped early"}  # none cut mid-fold
    first = min(t.info.start_time for t in trials)
    assert max(t.info.start_time for t in trials) - first < 75_000  # none started once the budget was spent
    tuned = [t for t in trials if t.data.params["finetune"] == "last_k" and t.data.tags[TAG_ENDED] == "completed"]
    assert tuned, "no fine-tuning trial ran every fold"
    assert {a.path for a in client.list_artifacts(tuned[0].info.run_id)} >= {"oof.npz"}
