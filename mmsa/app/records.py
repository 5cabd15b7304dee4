"""What every run records in MLflow beyond its metrics: context tags, the datasets it used, the
confusion matrix. The MLflow edge shared by mmsa's CLIs and the search driver (imported only by
them; the model library itself never imports MLflow)."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from mmsa.data.splits import Split


def context_tags(tags: dict[str, str]) -> dict[str, str]:
    """`tags` plus MLflow's own context tags (source file, git commit where there is one, user),
    as `mlflow.start_run` would add them; `create_run` through a client adds none."""
    from mlflow.tracking.context.registry import resolve_tags
    return resolve_tags(tags)


def digests(features, parts: dict[str, Split | None]) -> dict[str, str]:
    """{context: digest} of the non-empty parts (train / validation / test): each digest hashes the
    part's pairs' content (the cache's per-pair hashes) and labels."""
    return {context: features.content_digest(split.rows, split.labels)
            for context, split in parts.items() if split is not None and len(split)}


def fold_digests(features, folds: list[tuple[Split, Split]]) -> dict[str, str]:
    """Digests of a cross-validated search's data: train = every pair some fold trains on,
    validation = every pair some fold is scored on (with K >= 2 folds both are all labeled pairs)."""
    import numpy as np

    def union(parts: list[Split]) -> Split:
        rows, first = np.unique(np.concatenate([p.rows for p in parts]), return_index=True)
        labels = np.concatenate([p.labels for p in parts])[first]
        return Split(rows=rows, labels=labels, guids=[])
    return digests(features, {"train": union([tr for tr, _ in folds]), "validation": union([va for _, va in folds])})


def log_datasets(client: MlflowClient, run_id: str, data_dir: str, part_digests: dict[str, str]) -> None:
    """One dataset input per context, named after the data folder and sourced from it."""
    from pathlib import Path

    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
    folder = Path(data_dir).resolve()
    with warnings.catch_warnings():  # MLflow registers two local-file sources and warns that it picks one
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(folder))
    inputs = [DatasetInput(MetaDataset(source=source, name=f"{folder.name}-{context}", digest=digest)
                           ._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
              for context, digest in part_digests.items()]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


CONFUSION_FILE = "confusion_matrix.json"


def log_confusion(client: MlflowClient, run_id: str, matrix, title: str) -> None:
    """The confusion matrix as a figure, confusion_matrix.png, and as numbers (rows: true labels,
    columns: predicted), confusion_matrix.json."""
    import matplotlib.pyplot as plt

    from mmsa.data.dataset import LABELS
    from mmsa.app.plots import confusion_figure
    fig = confusion_figure(matrix, title)
    client.log_figure(run_id, fig, "confusion_matrix.png")
    plt.close(fig)
    client.log_dict(run_id, {"labels": list(LABELS), "matrix": [[int(v) for v in row] for row in matrix],
                             "title": title}, CONFUSION_FILE)


def load_confusion(client: MlflowClient, run_id: str) -> dict | None:
    """A run's confusion_matrix.json ({labels, matrix, title}), or None where it has none."""
    import json
    import tempfile

    from mlflow.exceptions import MlflowException
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return json.loads(open(client.download_artifacts(run_id, CONFUSION_FILE, tmp)).read())
        except (MlflowException, OSError, ValueError):
            return None
