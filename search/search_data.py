"""The data of a search: the labeled pairs with their features, built or checked once, and the
folds every trial and the probe share."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmsa.errors import UserError

if TYPE_CHECKING:
    from mmsa.features.prepare import Prepared
    from mmsa.data.splits import Split
    from mmsa.features.rawsource import RawSource
    from search.setup import Search
    from search.warm_start import WarmStart


@dataclass(frozen=True)
class SearchData:
    """The labeled pairs with their features, and the folds every trial and the probe share."""

    prepared: Prepared
    folds: list[tuple[Split, Split]]
    how: str  # how trials are scored, in words
    text_dirs: dict[str, str]  # the other text caches trials read (TrialData.text_dirs)
    datasets: dict[str, str]  # {context: digest} of the pairs, logged on every run (mmsa.app.records)
    raw: RawSource | None = None  # what finetune=full trials read, where the space has them
    fingerprint: str = ""  # of the labeled pairs, fold seed and cv_folds (TAG_FOLDS)
    warm: WarmStart | None = None  # what the earlier searches give (search.warm_start)


def prepare_data(search: Search) -> SearchData:
    """The labeled pairs and their frozen features (built or checked in a child process, so this
    driver never holds torch: the probe and the trials on cached features read them), the other
    kinds of features trials read (the text caches of finetune=last_k, the pairs themselves for
    finetune=full), and the folds every trial and the probe share."""
    from dataclasses import replace as replaced

    from mmsa.app.records import fold_digests
    from mmsa.features.prepare import at_text_depth, prepare_in_subprocess
    from mmsa.data.splits import cv_splits
    from mmsa.features.rawsource import RawSource
    from search.space import check_against_data
    spec, base, t0 = search.spec, search.base, time.time()
    kinds = spec.feature_configs()
    print(f"data: {base.data.data_dir}; preparing features (built once, then cached)", flush=True)
    # every labeled pair comes back as `train`; the text caches of finetune=last_k (the hidden
    # states entering the layers that train) are built in the same pass of the text backbone
    depths = tuple(sorted({kind.text_depth for kind in kinds if kind.finetune == "last_k"}))
    if depths:
        print(f"data: caching the text features of finetune=last_k ({', '.join(map(str, depths))} text layers "
              f"train) beside the frozen ones", flush=True)
    data = prepare_in_subprocess(replaced(base.data, finetune="none"), val_fraction=0.0, also_depths=depths)
    from search.trainable import text_variant
    text_dirs = {text_variant(at_text_depth(base.data, d)): folder for d, folder in data.text_dirs.items()}
    raw = None
    if any(kind.finetune == "full" for kind in kinds):
        print("data: finetune=full trials read the pairs themselves (backbones trained per batch); their images "
              "decoded once into the pixel cache", flush=True)
        from mmsa.processes import in_child
        raw = in_child(RawSource.from_files, data.dataset.all_examples, next(k for k in kinds if k.finetune == "full"))
    if spec.cv_folds == 1 and base.data.val_fraction <= 0:
        raise UserError(f"{spec.path}: cv_folds: 1 holds out one validation split, and needs val_fraction > 0")
    folds = cv_splits(data.train, spec.cv_folds, base.data.split_seed, base.data.val_fraction)
    check_against_data(spec, min(len(tr) for tr, _ in folds))
    how = (f"{spec.cv_folds}-fold cross-validation" if spec.cv_folds > 1
           else f"one held-out split of {len(folds[0][1])}")
    print(f"data: {len(data.train)} labeled pairs, trials scored by {how} (seed {base.data.split_seed}); "
          f"features ready in {time.time() - t0:.1f}s; {data.dataset.report.summary()}", flush=True)
    datasets = fold_digests(data.features, folds)
    from mmsa.features.featureset import digest
    fingerprint = digest(datasets["train"], datasets["validation"], str(spec.cv_folds), str(base.data.split_seed),
                         str(base.data.val_fraction) if spec.cv_folds == 1 else "")
    warm = None
    if search.warm_runs:
        from search.warm_start import gather
        store = search.store
        warm = gather([store.earlier_search(run) for run in search.warm_runs], spec, fingerprint, store.predictions)
        print(warm.line(), flush=True)
    return SearchData(data, folds, how, text_dirs, datasets, raw, fingerprint, warm)
