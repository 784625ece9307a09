"""Validation during training: sample images, the base-model benchmark, eval loss and CLIP scores.

``callback.build_validation_callback`` is the entry the trainer reaches through
CALLBACK_FACTORIES; the other modules each do one part of the job.
"""
