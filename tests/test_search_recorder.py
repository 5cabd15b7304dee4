from types import SimpleNamespace

from search.recorder import MAX_TAG_CHARS, TrialRecorder, trial_error_text


def test_a_long_trial_error_keeps_the_exception_line_first(tmp_path):
    frames = "".join(f'  File "/x/module{i}.py", line {i}, in f{i}\n    call({i})\n' for i in range(400))
    path = tmp_path / "error.txt"
    path.write_text("Traceback (most recent call last):\n" + frames + "TrainingError: loss became nan at epoch 2\n")
    text = trial_error_text(SimpleNamespace(error_file=str(path)))
    assert len(text) <= MAX_TAG_CHARS
    assert text.splitlines()[0] == "TrainingError: loss became nan at epoch 2"
    assert text.endswith("call(399)")  # the innermost frames are kept


def test_runs_left_open_by_a_killed_driver_are_closed_and_said_to_be_lost(tmp_path):
    """After a complete resumed search, a run still open belongs to a trial Ray never saved."""
    from mlflow.tracking import MlflowClient

    from mmsa.app.run_tags import TAG_ENDED, TAG_KIND, TAG_NOT_RESUMED, TAG_PARENT, TAG_TRIAL
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("x")
    parent = client.create_run(exp, tags={TAG_KIND: "search"}).info.run_id
    runs = {t: client.create_run(exp, tags={TAG_PARENT: parent, TAG_KIND: "trial", TAG_TRIAL: t}).info.run_id
            for t in ("b_2", "a_1", "c_3")}
    client.set_terminated(runs["c_3"], status="FINISHED")
    from search.record import SearchRecord, TrackingStore
    record = SearchRecord(TrackingStore(uri, "x"), parent)
    assert record.close_open_trials(complete=True) == ["a_1", "b_2"]
    for t in ("a_1", "b_2"):
        run = client.get_run(runs[t])
        assert run.info.status == "KILLED" and run.data.tags[TAG_ENDED] == "interrupted"
        assert "not trained again" in run.data.tags[TAG_NOT_RESUMED]
    assert client.get_run(runs["c_3"]).info.status == "FINISHED"
    # interrupted now (not complete): closed for --resume, not called lost
    again = client.create_run(exp, tags={TAG_PARENT: parent, TAG_KIND: "trial", TAG_TRIAL: "d_4"}).info.run_id
    assert record.close_open_trials() == ["d_4"]
    assert TAG_NOT_RESUMED not in client.get_run(again).data.tags


def test_a_trial_whose_process_was_killed_says_so_first(tmp_path):
    ray_text = ("ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
                "\tclass_name: ImplicitFunc\n"
                "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
                "detail: Worker unexpectedly exits with a connection error code 2. End of file.")
    path = tmp_path / "error.txt"
    path.write_text(ray_text)
    text = trial_error_text(SimpleNamespace(error_file=str(path)))
    assert text.splitlines()[0] == "trial process killed (signal 9, possibly out of memory) or crashed"
    assert "ActorDiedError" in text  # Ray's words kept below
    path.write_text("Traceback (most recent call last):\nValueError: bad\n")
    assert trial_error_text(SimpleNamespace(error_file=str(path))).splitlines()[0] == "ValueError: bad"


def test_writes_wait_in_order_while_the_tracking_server_does_not_answer(monkeypatch, capsys):
    import pytest

    from mmsa.errors import UserError
    from tests.search_helpers import free_port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    from search.recorder import EndTrial, StartTrial, TrialResult
    from search.trial_report import TrialReport
    logger = TrialRecorder(uri, "mmsa-search", "parent", {"lr": 0.1})
    report = TrialReport(fold=1, epoch=1, fold_end=True, folds_done=1, epochs_done=1, scores={"val_acc": 0.5})
    trial = SimpleNamespace(trial_id="t1", config={"lr": 0.2}, last_result=report.to_result())
    logger.on_trial_start(0, [], trial)
    logger.on_trial_result(0, [], trial, {"training_iteration": 1, **report.to_result()})
    logger.on_trial_complete(0, [], trial)
    kinds = [StartTrial, TrialResult, EndTrial]
    assert [type(op) for op in logger._pending] == kinds  # kept, in order
    assert logger._pending[1].report == report  # what Ray added to the result is not the trial's
    assert capsys.readouterr().out.count("is not answering; the search goes on") == 1  # said once
    with pytest.raises(UserError, match="3 records of this search are not written.*--resume"):
        logger.flush(wait_s=0)
    import pickle
    assert [type(op) for op in pickle.loads(pickle.dumps(logger))._pending] == kinds
