"""Names of the MLflow tags and the store that the search writes and `mmsa.final` reads: the one
contract between `search/` and `mmsa/final.py` (mmsa may not import search), and how both
resolve the store: a flag beats MLflow's own environment variables, which beat the defaults."""

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
DEFAULT_EXPERIMENT = "mmsa-search"
# Makes the MLflow UI open the experiment on its training runs, not on the GenAI overview.
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}

TAG_KIND = "mmsa.kind"  # search | trial | final
TAG_STATE = "mmsa.state"  # on a search: running | interrupted | finished
TAG_TRIAL = "mmsa.trial_id"
TAG_ATTEMPT = "mmsa.attempt"
TAG_ENDED = "mmsa.ended"  # on a trial: completed | stopped early | failed | interrupted
TAG_ERROR = "mmsa.error"
TAG_NOT_RESUMED = "mmsa.not_resumed"  # on an interrupted trial that Ray did not know when resuming
TAG_NODE = "mmsa.node_id"  # the Ray node a trial ran on
TAG_DEVICE = "mmsa.device"  # what a trial trained on: cpu, or cuda (where it reserved a GPU)
TAG_SPACE = "mmsa.space"
TAG_RAY_PATH = "mmsa.ray_path"
TAG_BEST_RUN = "mmsa.best_trial_run_id"
TAG_SOURCE = "mmsa.source"  # on a final run: which search or trial its config came from
# On a search: a fingerprint of its labeled pairs (their content and labels), fold seed and
# cv_folds: two searches with the same one scored their trials on the same folds (search.warm_start).
TAG_FOLDS = "mmsa.folds_fingerprint"
TAG_PARENT = "mlflow.parentRunId"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` tracking URI; None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the local sqlite store."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def experiment_name(flag: str | None) -> str:
    """--experiment, else MLFLOW_EXPERIMENT_NAME, else mmsa-search."""
    return flag or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


# A search's parent-run artifact: the plan of the final model, the members mmsa.final retrains
# (mmsa.training.plan; search/ensemble.py writes it). A final run logs the plan it executed too.
PLAN_ARTIFACT = "plan.json"
