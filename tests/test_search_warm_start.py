"""search/warm_start.py: earlier searches, as their records hold them, make the next one better."""

import shutil
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mmsa.config import Config
from mmsa.errors import UserError
from search.record import TrialRecord
from search.space import load_space
from search.warm_start import refuse_own, sampler_point
from tests.search_helpers import ROOT, child_runs, run_search, search_cmd, write_space

SPACE = ("fixed: {d_model: 32}\nparams:\n  lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}\n"
         "  head: {type: choice, values: [fusion, mlp]}\n")


def _trial(params: dict, ended="completed", score=0.7, **metrics) -> TrialRecord:
    flat = {**Config().to_flat(), "max_epochs": 8, "monitor": "val_acc", "patience": 0, **params}
    return TrialRecord("run", "t1", ended, 3, 6, 2, score, metrics, {k: str(v) for k, v in flat.items()})


def _none(run_id):  # a trial without recorded predictions
    return None


def test_an_earlier_trial_is_a_point_of_the_new_space_only_where_it_lies_inside(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE)
    spec = load_space(tmp_path / "s.yaml")
    base = spec.base_config().to_flat()
    inside = sampler_point(_trial({"d_model": 32, "lr": 1e-3, "head": "mlp", "cache_dir": "/elsewhere"}),
                            spec, base, "val_acc", _none)
    assert inside.params == {"lr": 1e-3, "head": "mlp"} and inside.value == 0.7  # where it ran does not matter
    assert sampler_point(_trial({"d_model": 32, "lr": 9e-3, "head": "mlp"}), spec, base, "val_acc", _none) is None
    assert sampler_point(_trial({"d_model": 64, "lr": 1e-3, "head": "mlp"}), spec, base, "val_acc", _none) is None
    early = sampler_point(_trial({"d_model": 32, "lr": 1e-3, "head": "fusion"}, ended="stopped early",
                                        score=0.6, val_macro_f1_at_best=0.55), spec, base, "val_acc", _none)
    assert early.value is None and early.intermediate == 0.6  # a pruned point for TPE
    (tmp_path / "f1.yaml").write_text(SPACE + "metric: val_macro_f1\n")
    by_f1 = load_space(tmp_path / "f1.yaml")
    rescored = sampler_point(_trial({"d_model": 32, "lr": 1e-3, "head": "mlp"},
                                           ended="stopped early", val_macro_f1_at_best=0.55),
                              by_f1, by_f1.base_config().to_flat(), "val_acc", _none)
    assert rescored.intermediate == 0.55  # another metric: the one its run recorded beside its own


def test_a_space_file_may_list_earlier_searches(tmp_path):
    (tmp_path / "s.yaml").write_text(SPACE + "warm_start: [abc, def]\n")
    assert load_space(tmp_path / "s.yaml").warm_start == ("abc", "def")
    (tmp_path / "bad.yaml").write_text(SPACE + "warm_start: abc\n")
    with pytest.raises(UserError, match="'warm_start' must be a list"):
        load_space(tmp_path / "bad.yaml")


def test_a_search_cannot_start_from_itself():
    with pytest.raises(UserError, match="that is this search itself"):
        refuse_own(["abc"], own_id="abc")
    refuse_own(["abc"], own_id=None)


def _warm_search(tmp, space, *more, timeout=600):
    return subprocess.run(search_cmd(space, tmp, *more), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_a_search_warm_started_from_another_space_reuses_its_trials(smoke_search, subset_dir, subset_cache, tmp_path):
    tmp, uri, earlier, _ = smoke_search
    store = tmp_path / "store"
    shutil.copytree(tmp / "mlruns", store / "mlruns")  # the earlier search's store, left as it was for other tests
    space = write_space(tmp_path / "other.yaml", str(subset_dir), str(subset_cache), num_samples=2, max_epochs=2,
                        seed=1, params={"lr": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
                                        "pooling": {"type": "choice", "values": ["mean", "attention", "first"]}})
    out = _warm_search(store, space, "--warm-start", earlier)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "warm start: 4 finished trial(s) of 1 earlier search(es), none trained again" in out.stdout
    assert "trial(s) of earlier searches are candidates of the ensemble" in out.stdout
    client = MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")
    parent_id = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    parent = client.get_run(parent_id)
    assert parent.data.params["warm_start"] == earlier
    assert len(child_runs(client, parent.info.experiment_id, parent_id)) == 2  # its own trials only: none re-run
    import json
    from pathlib import Path
    record = json.loads(Path(client.download_artifacts(parent_id, "warm_start.json", str(tmp_path))).read_text())
    earlier_trials = record["searches"][earlier]
    assert earlier_trials["same_labeled_pairs_and_folds"] and earlier_trials["ensemble_candidates"]
    assert parent.data.metrics["warm_trials_candidates"] == len(earlier_trials["ensemble_candidates"])
    # final trains the plan, an earlier search's trial among its members or not, as its own
    final = subprocess.run([__import__("sys").executable, "-m", "mmsa.final", "--run-id", parent_id, "--tracking-uri",
                            f"sqlite:///{store}/mlruns/mlflow.db", "--out", str(tmp_path / "p.txt"),
                            "--members", "ensemble:seeds=1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert final.returncode == 0, final.stderr[-3000:]


@pytest.mark.slow
def test_a_search_of_other_data_informs_the_sampler_never_the_ensemble(smoke_search, subset_cache, tmp_path):
    from tests.conftest import make_subset
    tmp, uri, earlier, _ = smoke_search
    store = tmp_path / "store"
    shutil.copytree(tmp / "mlruns", store / "mlruns")
    other = make_subset(tmp_path / "other-data", per_class=20, n_test=5)
    earlier_space = yaml.safe_load((tmp / "space.yaml").read_text())
    space = write_space(tmp_path / "s.yaml", str(other), str(subset_cache), num_samples=1, max_epochs=2,
                        params=earlier_space["params"])
    out = _warm_search(store, space, "--warm-start", earlier)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"search {earlier}: its fingerprint of labeled pairs and folds differs (other labeled pairs or other " \
           f"folds): its trials may tell the searcher, never enter the ensemble" in out.stdout
    assert "are candidates of the ensemble, beside" not in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown", "trial", "empty"])
def test_what_cannot_be_used_is_refused_in_one_line_before_anything_is_recorded(smoke_search, subset_dir,
                                                                                 subset_cache, tmp_path, case):
    tmp, uri, earlier, _ = smoke_search
    store = tmp_path / "store"
    shutil.copytree(tmp / "mlruns", store / "mlruns")
    client = MlflowClient(f"sqlite:///{store}/mlruns/mlflow.db")
    experiment = client.get_run(earlier).info.experiment_id
    if case == "unknown":
        run_id, said = "0" * 32, "no such run in the tracking store"
    elif case == "trial":
        run_id, said = child_runs(client, experiment, earlier)[0].info.run_id, "not a search's parent run (it is a trial run)"
    else:  # a search that finished no trial
        run_id = client.create_run(experiment, tags={"mmsa.kind": "search"}).info.run_id
        said = "nothing to reuse: none of its 0 finished trial(s)"
    before = len(client.search_runs([experiment], max_results=5000))
    space = write_space(tmp_path / "s.yaml", str(subset_dir), str(subset_cache), num_samples=1)
    out = run_search(space, store, "--warm-start", run_id, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"--warm-start {run_id}: {said}" in out.stderr
    assert len(client.search_runs([experiment], max_results=5000)) == before  # nothing recorded


@pytest.mark.slow
def test_a_warm_started_search_resumes_with_the_warm_start_it_began_with(smoke_search, subset_dir, subset_cache,
                                                                         tmp_path):
    import signal

    from tests.search_helpers import TrialHold
    tmp, uri, earlier, _ = smoke_search
    store = tmp_path / "store"
    shutil.copytree(tmp / "mlruns", store / "mlruns")
    space = write_space(tmp_path / "s.yaml", str(subset_dir), str(subset_cache), num_samples=2, max_epochs=2)
    hold = TrialHold(tmp_path / "hold", nth=1)
    proc = subprocess.Popen(search_cmd(space, store, "--warm-start", earlier), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=hold.env())
    hold.wait_held(proc)
    proc.send_signal(signal.SIGTERM)
    first = proc.communicate(timeout=120)[0]
    hold.release()
    assert "search interrupted" in first, first[-3000:]
    other = _warm_search(store, space, "--resume", "--warm-start", "0" * 32)
    assert other.returncode == 2 and "a search's warm start is fixed when it starts" in other.stderr
    resumed = _warm_search(store, space, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "warm start: 4 finished trial(s) of 1 earlier search(es)" in resumed.stdout
    assert "trial(s) of earlier searches are candidates of the ensemble" in resumed.stdout
