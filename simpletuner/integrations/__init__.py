"""Side jobs around a training run: trackers, webhooks, user hook scripts, the disk-space guard.

Each feature is a small module; the ones that react to training events expose
a factory listed in ``simpletuner.training.callbacks.CALLBACK_FACTORIES``.
``checks.integration_errors`` validates their settings before any model loads.
"""
