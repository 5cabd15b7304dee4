"""The edges of the library: the command lines (train, final, predict), MLflow records and run tags, the MLflow pyfunc model, plots. The only part of mmsa that imports MLflow or parses arguments."""
