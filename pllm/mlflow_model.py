"""MLflow models-from-code entry: MLflow runs this file to build the pyfunc when the model is loaded,
so nothing is pickled into the logged model."""

import mlflow

from pllm.registry import TextGenerator

mlflow.models.set_model(TextGenerator())
