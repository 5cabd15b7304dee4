"""From a config to what training needs: the dataset, its cached features, seeded splits."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


from mmsa.config import DataConfig
from mmsa.data.dataset import Dataset, load_dataset
from mmsa.data.folds import split_train_val
from mmsa.data.splits import Split
from mmsa.features.featureset import Features, FeatureSet
from mmsa.features.rawsource import RawSource
from mmsa.processes import in_child


@dataclass
class Prepared:
    dataset: Dataset
    features: Features  # a FeatureSet (the cache), or a RawSource when finetune=full
    train: Split
    val: Split | None
    test: Split
    text_dirs: dict[int, str] = field(default_factory=dict)  # the text caches of prepare's also_depths


def at_text_depth(cfg: DataConfig, depth: int) -> DataConfig:
    """`cfg` reading the text cache of `depth` (DataConfig.text_depth): 0 frozen, else last_k."""
    return replace(cfg, finetune="last_k", text_finetune_layers=depth) if depth else replace(cfg, finetune="none")


def prepare(cfg: DataConfig, val_fraction: float | None = None, also_depths: tuple[int, ...] = ()) -> Prepared:
    """Load the dataset and its features (building the cache once), then split train/val.
    `also_depths`: the text caches of these depths too (built in the same pass of the text
    backbone where missing), their folders in `text_dirs`.

    Training pairs whose image turned out unreadable are dropped here and counted in the report.
    """
    from mmsa.features.encoders import check_encoder_names
    from mmsa.features.cache import build_text_cache, load_features
    check_encoder_names(cfg.text_encoder, cfg.image_encoder)
    dataset = load_dataset(cfg.data_dir)
    text_dirs = {}
    if cfg.finetune == "full":  # backbones run per batch: no cache to build
        features = RawSource.from_files(dataset.all_examples, cfg)
    else:
        features = load_features(cfg, dataset, also_depths)
        text_dirs = {d: str(build_text_cache(at_text_depth(cfg, d), dataset.all_examples)[1].resolve())
                     for d in also_depths}
    unreadable = set(dataset.report.unreadable_image)
    usable = [ex for ex in dataset.train if ex.guid not in unreadable]
    dataset.report.skipped_train.extend(ex.guid for ex in dataset.train if ex.guid in unreadable)
    fraction = cfg.val_fraction if val_fraction is None else val_fraction
    train, val = split_train_val(usable, fraction, cfg.split_seed)
    return Prepared(dataset=dataset, features=features, train=Split.of(features, train),
                    val=Split.of(features, val) if val else None,
                    test=Split.of(features, dataset.test), text_dirs=text_dirs)


class Preparations:
    """`prepare(cfg, val_fraction=0)` once per kind of features (DataConfig.feature_key): every
    labeled pair as `train`, the test pairs as `test`. What training the members of a final model
    reads (mmsa.training.plan.train_plan), the features of each kind built or loaded once."""

    def __init__(self):
        self._done: dict[tuple, Prepared] = {}

    def __call__(self, cfg: DataConfig) -> Prepared:
        key = (cfg.data_dir, cfg.cache_dir, cfg.feature_key())
        if key not in self._done:
            self._done[key] = prepare(cfg, val_fraction=0.0)
        return self._done[key]


def _prepare_for_parent(cfg: DataConfig, val_fraction: float | None, also_depths: tuple[int, ...]) -> tuple | Prepared:
    data = prepare(cfg, val_fraction, also_depths)
    f = data.features
    if isinstance(f, RawSource):  # small and lazy: it travels whole
        return data
    return (data.dataset, f.guids, str(f.text_dir), str(f.image_dir), data.train, data.val, data.test,
            data.text_dirs)


def prepare_in_subprocess(cfg: DataConfig, val_fraction: float | None = None,
                          also_depths: tuple[int, ...] = ()) -> Prepared:
    """`prepare()` in a short-lived child process; this process then only memory-maps the cache.

    Building (or merely fingerprinting) the cache loads torch and both backbones; done here, they
    would stay in this process's memory for good. The search driver calls this, so that for the
    whole search it holds no torch and no backbone (what that saves: bench/results/memory.md).
    Errors in the child (a bad dataset folder, ...) are raised here as they are.
    With finetune=full there is no cache (backbones run per batch): the child only reads the
    dataset and splits it.
    """
    result = in_child(_prepare_for_parent, cfg, val_fraction, tuple(also_depths))
    if isinstance(result, Prepared):
        return result
    dataset, guids, text_dir, image_dir, train, val, test, text_dirs = result
    return Prepared(dataset=dataset, features=FeatureSet.open(guids, text_dir, image_dir), train=train, val=val,
                    test=test, text_dirs=text_dirs)


