"""The model and its training, one module per job: ``params`` (per-run params and their choices),
``model`` (VGG16 with our head), the training loop ``train`` (with ``schedule``, ``input``,
``checkpoints``, ``precision``), ``predict`` (the batched prediction evaluation, promotion and
serving share), ``evaluate`` (the untouched test split) and ``export`` (the CPU engine).

The trust policy each version carries: ``trust_policy`` (what serving loads and applies),
``trust_fitting`` (the calibrate step that fits it), with ``calibration`` (the temperature),
``review_thresholds`` (review threshold, blast flag), ``drift_limits``, ``unfamiliar`` and
``outputs`` (the model's four outputs); ``evaluate_trust`` measures it on the test split."""
