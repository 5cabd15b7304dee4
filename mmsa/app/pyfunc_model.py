"""The file MLflow runs to build the pyfunc model (models from code: nothing is pickled)."""

from mlflow.models import set_model

from mmsa.app.pyfunc import SentimentModel

set_model(SentimentModel())
