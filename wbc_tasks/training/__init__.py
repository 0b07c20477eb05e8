"""The model and its training: per-run params, VGG16 with our head, the training loop
(schedule, input, checkpoints, precision) and evaluation on the untouched test split.
Imports ``core`` and ``data``; never MLflow."""
