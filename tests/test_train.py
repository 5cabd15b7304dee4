import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmsa.config import Config
from mmsa.models.runtime import predict_proba
from mmsa.training.fit import Training, TrainingError, class_weights, classification_metrics, fit


def _cfg(data_cfg, **train):
    return Config(data=data_cfg).updated({"d_model": 32, "heads": 2, **train}, source="test")


def test_one_epoch_metrics_are_computed_not_assumed(subset_prepared):
    data_cfg, p = subset_prepared
    training = Training(_cfg(data_cfg, max_epochs=1, batch_size=16), p.features, p.train, p.val)
    epochs = list(training)
    result = training.result
    m = result.metrics
    probs = predict_proba(result.model, p.features, p.val.rows, torch.device("cpu"))
    expected = classification_metrics(p.val.labels, probs.argmax(1))
    assert m["val_acc"] == pytest.approx(expected["val_acc"])
    assert m["val_macro_f1"] == pytest.approx(expected["val_macro_f1"])
    assert np.asarray(m["val_confusion"]).sum() == len(p.val)
    assert epochs[0].last and epochs[0].number == 1 and m["epochs_run"] == 1 and np.isfinite(m["train_loss"])


def test_accumulation_matches_the_full_batch(subset_prepared):
    data_cfg, p = subset_prepared
    train = replace(p.train, rows=p.train.rows[:16], labels=p.train.labels[:16], guids=p.train.guids[:16])
    models = []
    for micro in (0, 4):
        cfg = _cfg(data_cfg, max_epochs=1, batch_size=16, micro_batch=micro, dropout=0.0, token_dropout=0.0,
                   warmup_frac=0.0)
        models.append(fit(cfg, p.features, train, None).model.state_dict())
    for key in models[0]:
        assert torch.allclose(models[0][key], models[1][key], atol=1e-5), key


def test_ema_weights_are_evaluated_and_kept_as_a_plain_state_dict(subset_prepared):
    data_cfg, p = subset_prepared
    train = replace(p.train, rows=p.train.rows[:16], labels=p.train.labels[:16], guids=p.train.guids[:16])
    states = {}
    for ema in (0.0, 0.5):
        cfg = _cfg(data_cfg, max_epochs=1, batch_size=8, dropout=0.0, token_dropout=0.0, warmup_frac=0.0, ema=ema)
        states[ema] = fit(cfg, p.features, train, None).model.state_dict()
    assert states[0.5].keys() == states[0.0].keys()  # no AveragedModel "module." prefix
    # Same training trajectory (same seed); the kept weights are the average, not the last step's.
    assert any(not torch.allclose(states[0.0][k].float(), states[0.5][k].float()) for k in states[0.0])


def test_fit_builds_its_model_with_the_one_factory_and_leaves_the_config_as_it_was(subset_prepared):
    import copy

    from mmsa.models.factory import create_model
    data_cfg, p = subset_prepared
    cfg = _cfg(data_cfg, max_epochs=1, batch_size=16)
    before = copy.deepcopy(cfg)
    result = fit(cfg, p.features, p.train, p.val)
    assert cfg == before  # building a model never changes the config
    assert (result.cfg.model.text_dim, result.cfg.model.image_dim) == (p.features.text_dim, p.features.image_dim)
    create_model(result.cfg).load_state_dict(result.model.state_dict())  # a checkpoint rebuilds from its config


def test_class_weights():
    labels = np.array([0] * 8 + [1] * 2 + [2] * 4)
    assert torch.allclose(class_weights("none", labels, 3), torch.ones(3))
    balanced = class_weights("balanced", labels, 3)
    assert balanced[1] > balanced[2] > balanced[0] and balanced.mean() == pytest.approx(1)
    sqrt = class_weights("sqrt", labels, 3)
    assert sqrt[1] / sqrt[0] == pytest.approx((balanced[1] / balanced[0]).sqrt())


def test_nan_loss_raises(subset_prepared):
    data_cfg, p = subset_prepared
    broken = replace(p.features, text=np.full(p.features.text.shape, np.nan, dtype=np.float16))
    with pytest.raises(TrainingError, match="loss became nan"):
        fit(_cfg(data_cfg, max_epochs=1), broken, p.train, p.val)


def test_early_stopping_and_best_epoch(subset_prepared):
    data_cfg, p = subset_prepared
    training = Training(_cfg(data_cfg, max_epochs=6, patience=1, lr=3e-3), p.features, p.train, p.val)
    epochs = list(training)
    seen, m = [e.metrics for e in epochs], training.result.metrics
    assert m["epochs_run"] == len(seen) and epochs[-1].last and not any(e.last for e in epochs[:-1])
    assert m["val_acc"] == max(s["val_acc"] for s in seen)
    if m["epochs_run"] < 6:  # it stopped: exactly one epoch without improvement after the best
        assert m["epochs_run"] == m["best_epoch"] + 1


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmsa.train", *args], capture_output=True, text=True, timeout=300)


def test_cli_last_line_is_metrics_json(subset_prepared):
    data_cfg, _ = subset_prepared
    out = _run_cli("--data", data_cfg.data_dir, "--set", "max_epochs=1", "--set", f"cache_dir={data_cfg.cache_dir}",
                   "--set", "max_text_len=32", "--set", "val_fraction=0.3", "--set", "modalities=text")
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("metrics=")
    metrics = json.loads(last[len("metrics="):])
    confusion = np.array(metrics["val_confusion"])
    assert confusion.sum() == 27  # the 30% validation part of the 90 pairs
    assert metrics["val_acc"] == pytest.approx(np.trace(confusion) / confusion.sum())  # from the predictions
    assert "val_macro_f1" in metrics and metrics["best_epoch"] == 1


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    out = _run_cli("--data", str(tmp_path), "--set", "pooling=max")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "pooling" in out.stderr and "Traceback" not in out.stderr
    out = _run_cli("--data", str(tmp_path / "absent"))
    assert out.returncode == 2 and "dataset folder not found" in out.stderr


def test_last_k_text_layers_train_with_the_head(subset_dir, subset_cache):
    from mmsa.config import DataConfig
    from mmsa.features.prepare import prepare
    data_cfg = DataConfig(data_dir=str(subset_dir), cache_dir=str(subset_cache), val_fraction=0.3,
                          max_text_len=32, finetune="last_k", text_finetune_layers=1)
    p = prepare(data_cfg)
    cfg = _cfg(data_cfg, max_epochs=1, batch_size=16)
    from mmsa.models.factory import create_model
    before = {k: v.clone() for k, v in create_model(cfg.with_features(p.features)).state_dict().items()
              if k.startswith("text_top")}
    assert before, "the top text layer is part of the model"
    result = fit(cfg, p.features, p.train, p.val)
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it was trained
    # the kept model is the one scored: predicting again gives the reported accuracy
    probs = predict_proba(result.model, p.features, p.val.rows, torch.device("cpu"))
    assert result.metrics["val_acc"] == pytest.approx(float((probs.argmax(1) == p.val.labels).mean()))


def test_full_finetune_trains_the_backbones(subset_dir, tmp_path):
    from mmsa.config import DataConfig
    from mmsa.features.rawsource import RawSource
    from mmsa.features.prepare import prepare
    data_cfg = DataConfig(data_dir=str(subset_dir), cache_dir=str(tmp_path / "cache"), val_fraction=0.3,
                          max_text_len=16, finetune="full")
    p = prepare(data_cfg)
    # no feature cache: the images alone, decoded once (mmsa.features.pixels)
    assert isinstance(p.features, RawSource) and p.features.pixel_dir is not None
    assert [f.name.split("-")[0] for f in (tmp_path / "cache").iterdir() if f.is_dir()] == ["pixels"]
    train = replace(p.train, rows=p.train.rows[:8], labels=p.train.labels[:8], guids=p.train.guids[:8])
    val = replace(p.val, rows=p.val.rows[:8], labels=p.val.labels[:8], guids=p.val.guids[:8])
    cfg = _cfg(data_cfg, max_epochs=1, batch_size=4, micro_batch=2)
    from mmsa.models.factory import create_model
    start = create_model(cfg.with_features(p.features)).state_dict()
    result = fit(cfg, p.features, train, val)
    end = result.model.state_dict()
    changed = [k for k in start if k.startswith(("text_backbone", "image_backbone")) and start[k].is_floating_point()
               and not torch.equal(start[k], end[k])]
    assert any(k.startswith("text_backbone") for k in changed) and any(k.startswith("image_backbone") for k in changed)
    assert sum(map(sum, result.metrics["val_confusion"])) == 8  # every validation pair was scored


def test_full_finetune_trains_the_backbones_at_a_scaled_learning_rate(subset_dir, tmp_path):
    from mmsa.config import DataConfig
    from mmsa.features.prepare import prepare
    from mmsa.models.factory import create_model
    from mmsa.training.fit import _new_trainee
    data_cfg = DataConfig(data_dir=str(subset_dir), cache_dir=str(tmp_path / "never"), max_text_len=16,
                          finetune="full")
    cfg = _cfg(data_cfg, lr=1e-3, backbone_lr_scale=0.05)
    data = prepare(data_cfg)
    model = create_model(cfg.with_features(data.features))
    head, backbones = _new_trainee(model, cfg, data.features, data.train, torch.device("cpu"),
                                   progress=False).optimizer.param_groups
    assert head["initial_lr"] == 1e-3 and backbones["initial_lr"] == pytest.approx(5e-5)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    n_backbone = sum(1 for _ in model.text_backbone.parameters()) + sum(1 for _ in model.image_backbone.parameters())
    assert len(backbones["params"]) == n_backbone


def test_progress_bar_over_the_steps_only_when_asked(subset_prepared, capsys):
    data_cfg, p = subset_prepared
    fit(_cfg(data_cfg, max_epochs=1, batch_size=16), p.features, p.train, None)
    assert "step" not in capsys.readouterr().err
    fit(_cfg(data_cfg, max_epochs=1, batch_size=16), p.features, p.train, None, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1" in err and "step" in err


def test_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    from mmsa.training.fit import warmup_cosine
    ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2))
    a, b = warmup_cosine(ours, 7, 50), get_cosine_schedule_with_warmup(theirs, 7, 50)
    for _ in range(50):
        assert a.get_last_lr() == pytest.approx(b.get_last_lr())
        ours.step(), theirs.step(), a.step(), b.step()


@pytest.mark.parametrize("native, emulated, expected", [(True, True, "bfloat16"), (False, True, "float16"),
                                                        (False, False, "float16")])
def test_mixed_precision_uses_bf16_only_where_the_card_has_it(monkeypatch, native, emulated, expected):
    from mmsa.models.runtime import amp_dtype
    # a T4 (Colab) reports bf16 only through emulation: fp16 there, with a gradient scaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: emulated if including_emulation else native)
    assert amp_dtype(torch.device("cuda")) == getattr(torch, expected)
    assert amp_dtype(torch.device("cpu")) is None


def test_precision_can_be_forced(monkeypatch):
    from mmsa.models.runtime import amp_dtype
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda")
    assert amp_dtype(cuda, "fp16") == torch.float16 and amp_dtype(cuda, "bf16") == torch.bfloat16
    assert amp_dtype(cuda, "fp32") is None and amp_dtype(torch.device("cpu"), "fp16") is None
    with pytest.raises(Exception, match="precision"):
        Config.from_flat({"precision": "fp8"})


def test_batches_of_similar_text_length_cover_every_pair_once_and_pad_less():
    import numpy as np

    from mmsa.training.fit import length_grouped_batches
    rng = np.random.default_rng(0)
    order = rng.permutation(1000)
    lengths = rng.integers(3, 65, 1000)  # of each pair, by position in the training part
    batches = length_grouped_batches(order, lengths[order], 32, rng, group=10)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert sorted(len(b) for b in batches)[1:] == [32] * (len(batches) - 1)  # one short batch at most per group
    grouped = np.mean([lengths[b].max() for b in batches])
    plain = np.mean([lengths[order[s:s + 32]].max() for s in range(0, 1000, 32)])
    assert grouped < 0.7 * plain  # tokens run per batch: its longest text
    # each batch is drawn from its own group of 10 batches of the shuffled order
    assert all(len({int(np.flatnonzero(np.isin(order, b))[0]) // 320, int(np.flatnonzero(np.isin(order, b))[-1]) // 320})
               == 1 for b in batches)


def test_an_epoch_reads_nothing_back_from_the_device_but_its_summed_loss(subset_prepared, monkeypatch):
    """On a GPU every read of a tensor's value (item, bool, float) waits for the queued steps: the
    training loop reads one per epoch, not one per micro-batch (the optimizer's own step counters
    live on the host)."""
    import sys
    from mmsa.training.fit import _new_trainee, _train_epoch
    from mmsa.models.factory import create_model
    data_cfg, p = subset_prepared
    cfg = _cfg(data_cfg, max_epochs=1, batch_size=8, micro_batch=4).with_features(p.features)
    trainee = _new_trainee(create_model(cfg), cfg, p.features, p.train, torch.device("cpu"), False)
    reads = []
    for name in ("item", "__bool__", "__float__"):
        real = getattr(torch.Tensor, name)
        def read(self, _real=real, _name=name):
            if sys._getframe(1).f_code.co_filename.endswith("fit.py"):  # by the training loop itself
                reads.append(_name)
            return _real(self)
        monkeypatch.setattr(torch.Tensor, name, read)
    loss, seen = _train_epoch(trainee, p.train, 1)
    assert seen == len(p.train) and reads == ["__float__"] and loss > 0


def test_a_fine_tuned_model_starts_the_same_whether_or_not_the_backbones_were_loaded_before(subset_dir, tmp_path):
    """Loading the pretrained backbones draws nothing from torch's random state: a trial's later folds
    (backbones already loaded) and the same fold after a resume (loaded afresh) start alike."""
    import numpy as np

    from mmsa.config import DataConfig
    from mmsa.features.prepare import prepare
    from mmsa.models.finetune import _pretrained
    data_cfg = DataConfig(data_dir=str(subset_dir), cache_dir=str(tmp_path), val_fraction=0.3, max_text_len=16,
                          finetune="full")
    p = prepare(data_cfg)
    train = replace(p.train, rows=p.train.rows[:8], labels=p.train.labels[:8], guids=p.train.guids[:8])
    val = replace(p.val, rows=p.val.rows[:4], labels=p.val.labels[:4], guids=p.val.guids[:4])
    cfg = _cfg(data_cfg, max_epochs=1, batch_size=4)
    runs = []
    for _ in range(2):
        if not runs:
            _pretrained.cache_clear()
        runs.append(fit(cfg, p.features, train, val, keep_probs=True).history[-1]["probs"])
    assert np.array_equal(runs[0], runs[1])
