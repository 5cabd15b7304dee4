import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from mmsa.app.run_tags import TAG_KIND
from tests.search_helpers import ROOT, child_runs

pytestmark = pytest.mark.slow  # a real search and retrains


def _final(uri, run_id, out, *more):
    return subprocess.run([sys.executable, "-m", "mmsa.final", "--run-id", run_id, "--tracking-uri", uri,
                           "--out", str(out), *more], capture_output=True, text=True, timeout=300, cwd=ROOT)


def _checkpoint(uri, run_id, tmp_path) -> dict:
    """The checkpoint inside the MLflow model that a final run logged."""
    import mlflow
    from pathlib import Path
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / run_id))
    return torch.load(Path(local) / "artifacts" / "model.pt", weights_only=True)


def _check_predictions(path, subset_dir):
    expected = [ln.split(",")[0] for ln in (subset_dir / "test_without_label.txt").read_text().split()[1:]]
    lines = path.read_text().splitlines()
    assert lines[0] == "guid,tag"
    rows = [ln.split(",") for ln in lines[1:]]
    assert [g for g, _ in rows] == expected
    assert {t for _, t in rows} <= {"positive", "neutral", "negative"}


def _plan(client, run_id, tmp_path):
    import json
    from pathlib import Path

    from mmsa.training.plan import Plan
    folder = tmp_path / f"plan-{run_id}"
    folder.mkdir()
    return Plan.from_dict(json.loads(Path(client.download_artifacts(run_id, "plan.json", str(folder))).read_text()))


def _latest_final(client, parent_id):
    return max(child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id, kind="final"),
               key=lambda r: r.info.start_time)


def test_final_from_the_search_parent_executes_its_plan(smoke_search, subset_dir, tmp_path):
    tmp, uri, parent_id, _ = smoke_search
    client = MlflowClient(uri)
    plan = _plan(client, parent_id, tmp_path)
    out = _final(uri, parent_id, tmp_path / "pred.txt")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"predictions={tmp_path / 'pred.txt'}"
    assert f"final model of search {parent_id}: {plan.describe()}" in out.stdout
    assert "class balance" in out.stdout
    _check_predictions(tmp_path / "pred.txt", subset_dir)
    final = _latest_final(client, parent_id)
    run_id = final.info.run_id
    assert _plan(client, run_id, tmp_path) == plan  # the plan it executed, recorded
    ckpt = _checkpoint(uri, run_id, tmp_path)
    assert set(ckpt) == {"format", "members", "labels"}
    # every member of the plan: a trial's as its seeds' models sharing its weight, the probe as one
    expected = []
    for m in plan.members:
        if m.seeds == 1:
            expected.append((m.name, m.weight))
        else:
            expected += [(f"{m.name}, seed {s}", m.weight / m.seeds) for s in range(m.seeds)]
    assert [m["name"] for m in ckpt["members"]] == [name for name, _ in expected]
    assert [m["weight"] for m in ckpt["members"]] == pytest.approx([w for _, w in expected])
    assert sum(m["weight"] for m in ckpt["members"]) == pytest.approx(1.0)
    from mmsa.config import Config
    from mmsa.models.factory import create_model
    for member in ckpt["members"]:
        create_model(Config.from_flat(member["config"])).load_state_dict(member["model"])  # rebuilt from its config
    assert {a.path for a in client.list_artifacts(run_id, "predictions")} == {"predictions/pred.txt"}


def test_members_are_chosen_merged_and_checked(smoke_search, subset_dir, tmp_path):
    tmp, uri, parent_id, _ = smoke_search
    out = _final(uri, parent_id, tmp_path / "pred.txt", "--members", "best:seeds=2,probe")
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(uri)
    best = client.get_run(client.get_run(parent_id).data.tags["mmsa.best_trial_run_id"]).data.tags["mmsa.trial_id"]
    members = _checkpoint(uri, _latest_final(client, parent_id).info.run_id, tmp_path)["members"]
    assert [(m["name"], m["weight"]) for m in members] == \
        [(f"trial {best}, seed 0", 0.25), (f"trial {best}, seed 1", 0.25), ("linear probe", 0.5)]
    assert members[0]["config"]["d_model"] == 32
    for bad, said in ((["--members", "probe,knn"], "'knn' is not one of"),
                      (["--members", "best:seeds=0"], "the one option is seeds=K"),
                      (["--members", "probe,probe"], "a part is named twice"),
                      (["--blend", "probe"], "--blend: removed; use --members"),
                      (["--seeds", "2"], "--seeds: removed; use --members ensemble:seeds=K"),
                      (["--bag", "folds"], "--bag: removed")):
        refused = _final(uri, parent_id, tmp_path / "q.txt", *bad)
        assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0 and said in refused.stderr
        assert not (tmp_path / "q.txt").exists()


def test_the_members_flag_is_documented_in_help():
    out = subprocess.run([sys.executable, "-m", "mmsa.final", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    assert "--members PARTS" in out.stdout and "NAME:seeds=K" in out.stdout and "--seeds" not in out.stdout


def test_final_from_one_trial(smoke_search, subset_dir, tmp_path):
    tmp, uri, parent_id, _ = smoke_search
    client = MlflowClient(uri)
    trial = child_runs(client, client.get_run(parent_id).info.experiment_id, parent_id)[0]
    out = _final(uri, trial.info.run_id, tmp_path / "p.txt", "--members", "best:seeds=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"final model of trial {trial.info.run_id}: trial {trial.data.tags['mmsa.trial_id']} (1.00)" in out.stdout
    _check_predictions(tmp_path / "p.txt", subset_dir)
    bad = _final(uri, trial.info.run_id, tmp_path / "q.txt", "--members", "ensemble")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no plan of a search" in bad.stderr


@pytest.mark.parametrize("case", ["unknown", "no-config", "deleted"])
def test_bad_run_ids_are_refused(smoke_search, tmp_path, case):
    tmp, uri, parent_id, _ = smoke_search
    client = MlflowClient(uri)
    run_id = "0" * 32
    if case != "unknown":
        run = client.create_run(client.get_run(parent_id).info.experiment_id)
        client.set_terminated(run.info.run_id)
        run_id = run.info.run_id
        if case == "deleted":
            client.set_tag(run_id, TAG_KIND, "trial")
            client.delete_run(run_id)
    out = _final(uri, run_id, tmp_path / "p.txt")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and run_id in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "p.txt").exists()


def test_test_pairs_with_a_missing_file_still_get_predictions(smoke_search, subset_dir, tmp_path):
    import os
    import shutil
    tmp, uri, parent_id, _ = smoke_search
    data = tmp_path / "data-copy"
    shutil.copytree(subset_dir, data, symlinks=True)
    test_guids = [ln.split(",")[0] for ln in (data / "test_without_label.txt").read_text().split()[1:]]
    os.unlink(data / "data" / f"{test_guids[0]}.jpg")  # no image
    os.unlink(data / "data" / f"{test_guids[1]}.jpg")
    (data / "data" / f"{test_guids[1]}.jpg").write_bytes(b"\xff\xd8\xff truncated")  # unreadable image
    os.unlink(data / "data" / f"{test_guids[2]}.txt")  # no text
    out = _final(uri, parent_id, tmp_path / "p.txt", "--data", str(data))
    assert out.returncode == 0, out.stderr[-3000:]
    _check_predictions(tmp_path / "p.txt", data)
    assert "3 test pairs predicted from one modality" in out.stdout
    assert all(g in out.stdout for g in test_guids[:3])


def _fully_fine_tuned_trial(smoke_search) -> tuple[str, str]:
    """A finished trial run whose config fine-tunes both backbones: (tracking uri, run id)."""
    _, uri, parent_id, _ = smoke_search
    client = MlflowClient(uri)
    run_id = client.create_run(client.get_run(parent_id).info.experiment_id, tags={TAG_KIND: "trial"}).info.run_id
    for key, value in {"finetune": "full", "d_model": 32, "heads": 2, "max_text_len": 16, "batch_size": 32}.items():
        client.log_param(run_id, key, value)
    client.log_metric(run_id, "val_acc", 0.5, step=1)
    client.set_terminated(run_id)
    return uri, run_id


def test_a_fully_fine_tuned_config_retrains_and_predicts(smoke_search, subset_dir, tmp_path):
    uri, run_id = _fully_fine_tuned_trial(smoke_search)
    out = _final(uri, run_id, tmp_path / "p.txt", "--data", str(subset_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    # one model: each fine-tunes both backbones (its epochs: the peak of its logged curve)
    assert f"final model of trial {run_id}: trial {run_id} (1.00)" in out.stdout
    _check_predictions(tmp_path / "p.txt", subset_dir)


def test_a_config_below_the_linear_probe_gets_a_warning(tmp_path):
    from mmsa.app.final import probe_warning
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("x")
    parent = client.create_run(exp).info.run_id
    client.log_metric(parent, "probe_val_acc", 0.72)
    trials = {}
    for name, score in (("below", 0.70), ("above", 0.73)):
        run_id = client.create_run(exp).info.run_id
        client.log_metric(run_id, "best_val_acc", score)
        trials[name] = client.get_run(run_id)
    warning = probe_warning(client, trials["below"].info.run_id, parent, "val_acc")
    assert warning.startswith("warning:") and "0.7000" in warning and "0.7200" in warning and "\n" not in warning
    assert probe_warning(client, trials["above"].info.run_id, parent, "val_acc") is None
    assert probe_warning(client, trials["below"].info.run_id, None, "val_acc") is None  # a trial of no search


def test_an_older_trial_run_gives_the_search_and_final_one_member(tmp_path):
    """One conversion from a trial run to a plan member (mmsa.training.plan.trial_member), for the
    search's plan and for final's --run-id alike: a trial recorded before the lexicon scores existed
    (no `lexicon` param) trains without them by either route."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from mmsa.app.final import run_member
    from mmsa.config import Config
    from search.ensemble import member
    from search.record import TrialRecord
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("x"), tags={"mmsa.kind": "trial",
                                                                    "mmsa.trial_id": "t_1"}).info.run_id
    flat = {k: v for k, v in Config().to_flat().items() if k != "lexicon"} | {"max_epochs": 6, "head": "mlp"}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in {**flat, "space_file": "old.yaml"}.items()])
    client.log_metric(run_id, "best_epoch", 4)
    run = client.get_run(run_id)
    by_final = run_member(client, run)
    by_search = member(TrialRecord(run_id, "t_1", "completed", 5, 30, 4, 0.7, dict(run.data.metrics),
                                   dict(run.data.params)))
    assert by_search == by_final
    assert by_final.config.model.lexicon is False and by_final.config.model.head == "mlp" and by_final.epochs == 4
