"""The model and its training: per-run params, VGG16 with our head, the training loop
(schedule, input, checkpoints, precision), evaluation on the untouched test split and the
batched prediction that evaluation, promotion and serving share; calibration and the trust
policy each version carries (``calibration``, ``unfamiliar``, ``trust``, ``evaluate_trust``).
Imports ``core`` and ``data``; never MLflow."""
