import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmsa.errors import ConfigError
from search.space import check_against_data, load_space

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
num_samples: 3
scheduler: {type: asha, max_epochs: 3}
fixed: {d_model: 64}
params:
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  pooling: {type: choice, values: [mean, attention]}
  fusion_depth: {type: int, low: 0, high: 2}
"""


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_spaces_load():
    for name in ("fusion.yaml", "smoke.yaml"):
        spec = load_space(ROOT / "spaces" / name)
        for key in ("lr", "batch_size", "fusion_depth", "pooling", "class_weights"):
            if name == "fusion.yaml":
                assert key in spec.params, key
        assert spec.optuna_space()


def test_the_metric_decides_what_trials_monitor(tmp_path):
    spec = load_space(_write(tmp_path, GOOD + "metric: val_macro_f1\n"))
    assert spec.base_config().train.monitor == "val_macro_f1"
    # what the search decides itself: trials train whole schedules, scored on the folds' mean curve
    assert (spec.base_config().train.patience, spec.base_config().train.stop_epoch) == (0, 0)
    assert load_space(_write(tmp_path, GOOD)).base_config().train.monitor == "val_acc"


def test_a_searched_schedule_length_overrides_the_schedulers(tmp_path):
    spec = load_space(_write(tmp_path, GOOD + "  max_epochs: {type: choice, values: [2, 4]}\n"))
    assert spec.base_config().train.max_epochs == 3 and spec.params["max_epochs"].values == [2, 4]


def test_good_space(tmp_path):
    spec = load_space(_write(tmp_path, GOOD))
    assert spec.num_samples == 3 and spec.max_epochs == 3 and spec.fixed == {"d_model": 64}
    from search.trainable import TrialData
    trial = TrialData(guids=[], text_dir="", image_dir="", folds=[], base=spec.base_config().to_flat(), threads=2)
    cfg = trial.config({"lr": 1e-3, "pooling": "attention", "fusion_depth": 2})
    assert cfg.model.d_model == 64 and cfg.model.pooling == "attention" and cfg.train.max_epochs == 3
    assert cfg.train.num_threads == 2


@pytest.mark.parametrize("text,match", [
    ("num_samples: 3\nwhatever: 1\n", "unknown key 'whatever'"),
    ("params:\n  learning_rate: {type: uniform, low: 0, high: 1}\n", "unknown key 'params.learning_rate'"),
    ("params:\n  lr: {type: uniform, low: 0.1, high: 0.01}\n", "params.lr': low 0.1 is above high 0.01"),
    ("params:\n  lr: {type: loguniform, low: 0, high: 0.01}\n", "params.lr': low 0 must be > 0 on a log scale"),
    ("params:\n  lr: {type: gaussian, low: 0, high: 1}\n", "unknown distribution 'gaussian'"),
    ("params:\n  pooling: {type: choice, values: [mean, max]}\n", "params.pooling.*'pooling'"),
    ("params:\n  fusion_depth: {type: int, low: 0.5, high: 2}\n", "whole numbers"),
    ("params:\n  lr: {type: uniform, low: 0.1}\n", "needs 'low' and 'high'"),
    ("fixed: {pooling: max}\n", "fixed.*pooling"),
    ("fixed: {image_dim: 64}\n", "fixed: key 'image_dim' follows from the data"),
    ("params:\n  text_dim: {type: int, low: 8, high: 16}\n", "params: key 'text_dim' follows from the data"),
    ("fixed: {image_encoder: vgg99}\n", "fixed.*'image_encoder' = 'vgg99'.*efficientnet_lite0"),
    ("fixed: {text_encoder: bert-nope}\n", "fixed.*'text_encoder' = 'bert-nope'"),
    ("params:\n  text_encoder: {type: choice, values: [minilm, bert-base-uncased]}\n", "params.text_encoder.*under 'fixed'"),
    ("params:\n  max_text_len: {type: choice, values: [32, 64]}\n", "params.max_text_len.*prepared once per search"),
    ("params:\n  finetune: {type: choice, values: [none, most]}\n", "params.finetune.*a choice among none, last_k and full"),
    ("params:\n  text_finetune_layers: {type: int, low: 1, high: 6}\n", "params.text_finetune_layers.*a choice of"),
    ("scheduler: {type: hyperband}\n", "scheduler.type"),
    ("fork_trials: false\n", "key 'fork_trials' was removed: every trial runs as a plain Ray worker"),
    ("mode: min\n", "key 'mode' was removed: both metrics .* are maximised"),
    ("fixed: {monitor: val_macro_f1}\n", "fixed: key 'monitor' cannot be set here: .* the search's `metric`"),
    ("fixed: {max_epochs: 9}\n", "fixed: key 'max_epochs' cannot be set here: .*`scheduler.max_epochs`"),
    ("fixed: {patience: 0}\n", "fixed: key 'patience' cannot be set here: trials train whole schedules"),
    ("params:\n  stop_epoch: {type: int, low: 1, high: 2}\n", "params: key 'stop_epoch' cannot be set here"),
    ("searcher: {start_from_defaults: 1}\n", "'searcher.start_from_defaults' must be true or false"),
    ("scheduler: {max_epochs: 3, grace_period: 6}\n", "grace_period"),
    ("cv_folds: 0\n", "cv_folds"),
    ("num_samples: lots\n", "num_samples"),
    ("params: [1, 2]\n", "params"),
    ("fixed: {lr: 0.1}\nparams:\n  lr: {type: uniform, low: 0.01, high: 0.1}\n", "both fixed and searched"),
    ("a: [1, 2\n", "invalid YAML"),
])
def test_bad_spaces_are_refused_with_one_line(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        load_space(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_space(tmp_path / "absent.yaml")


def test_batch_size_larger_than_the_data(tmp_path):
    spec = load_space(_write(tmp_path, "params:\n  batch_size: {type: choice, values: [16, 512]}\n"))
    with pytest.raises(ConfigError, match="batch_size.*512.*100 training"):
        check_against_data(spec, 100)


def test_cli_refuses_bad_space_before_ray(tmp_path):
    path = _write(tmp_path, "params:\n  lr: {type: loguniform, low: -1, high: 0.01}\n")
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(path),
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert str(path) in out.stderr and "params.lr" in out.stderr and "Traceback" not in out.stderr
    assert "ray" not in out.stdout.lower() and time.time() - start < 60


@pytest.mark.parametrize("budget, said", [("soon", "not a duration"), ("20s", "shorter than 60 s, too short for one fold")])
def test_cli_refuses_a_bad_time_budget_before_anything_is_recorded(tmp_path, budget, said):
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(ROOT / "spaces" / "smoke.yaml"),
                          "--time-budget", budget, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"--time-budget {budget}: {said}" in out.stderr and not (tmp_path / "mlflow.db").exists()


def test_a_space_that_searches_fine_tuning_lists_every_kind_of_features_its_trials_read(tmp_path):
    path = _write(tmp_path, "params:\n"
                            "  finetune: {type: choice, values: [none, last_k]}\n"
                            "  text_finetune_layers: {type: choice, values: [2, 6]}\n")
    kinds = [(d.finetune, d.text_finetune_layers) for d in load_space(path).feature_configs()]
    assert kinds == [("none", 2), ("last_k", 2), ("last_k", 6)]  # the base first; none reads one cache
    full = _write(tmp_path, "params:\n  finetune: {type: choice, values: [none, full]}\n")
    assert [d.finetune for d in load_space(full).feature_configs()] == ["none", "full"]  # full: searched beside
    plain = _write(tmp_path, "params:\n  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n")
    assert len(load_space(plain).feature_configs()) == 1


def test_command_line_flags_override_the_space_file():
    from search.space import apply_flags
    spec = load_space(ROOT / "spaces" / "fusion.yaml")
    assert "head" in spec.params and "lr" in spec.params
    flagged, unsearched = apply_flags(spec, cpus=2, gpus=0.5, max_concurrent=3, seed=7,
                                      sets={"head": "mlp", "warmup_frac": "0.2"})
    assert "head" in spec.params and spec.cpu == 1  # the space as loaded is never changed
    spec = flagged
    assert unsearched == ["head"] and "head" not in spec.params and "lr" in spec.params
    assert (spec.cpu, spec.gpu, spec.max_concurrent, spec.seed) == (2, 0.5, 3, 7) and not spec.gpu_auto
    auto, _ = apply_flags(spec, gpus="auto")
    assert auto.gpu_auto and auto.gpu == 1.0
    cfg = spec.base_config()
    assert cfg.model.head == "mlp" and cfg.train.warmup_frac == 0.2 and spec.fixed["warmup_frac"] == 0.2


@pytest.mark.parametrize("kwargs, match", [
    ({"cpus": 0}, r"--cpus-per-trial 0: must be > 0"),
    ({"gpus": -1}, r"--gpus-per-trial -1: must be in \[0, 1\], or auto"),
    ({"gpus": 2}, r"--gpus-per-trial 2: must be in \[0, 1\], or auto: a share of one GPU \(a trial trains on one"),
    ({"sets": {"device": "cuda"}}, r"device: cuda, but resources.gpu is 0"),
    ({"max_concurrent": 0}, r"--max-concurrent 0: must be > 0"),
    ({"sets": {"nope": "1"}}, r"--set: unknown key 'nope'"),
    ({"sets": {"head": "cnn"}}, r"--set: key 'head' = 'cnn'"),
    ({"sets": {"text_dim": "7"}}, r"--set: key 'text_dim' follows from the data"),
    ({"sets": {"monitor": "val_acc"}}, r"--set: key 'monitor' cannot be set here"),
])
def test_bad_flags_are_refused_with_one_line(kwargs, match):
    from search.space import apply_flags
    with pytest.raises(ConfigError, match=match):
        apply_flags(load_space(ROOT / "spaces" / "fusion.yaml"), **kwargs)


def test_cli_refuses_ray_client_addresses(tmp_path):
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(ROOT / "spaces" / "smoke.yaml"),
                          "--address", "ray://head:10001", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "ray://head:10001" in out.stderr


@pytest.mark.parametrize("address, env", [("127.0.0.1:1", {}), ("auto", {"RAY_ADDRESS": "127.0.0.1:1"})])
def test_cli_refuses_an_address_where_no_cluster_answers_at_once(tmp_path, address, env):
    # ray.init would wait minutes there (a head that died without `ray stop` leaves `auto` pointing at it)
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "search.run", "--space", str(ROOT / "spaces" / "smoke.yaml"),
                          "--address", address, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, **env})
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert f"--address {address}: no Ray cluster answers at " in out.stderr and ":1 (not started" in out.stderr
    assert time.time() - start < 60 and not (tmp_path / "mlflow.db").exists()


def test_loading_and_validating_a_space_imports_no_torch():
    # the search driver validates every space file; torch would stay in its memory for the whole search
    code = ("import sys; from search.space import load_space; "
            "load_space('spaces/fusion.yaml').base_config(); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
