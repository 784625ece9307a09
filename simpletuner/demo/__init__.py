"""Demo material: a small generated image set to train on without downloading anything."""
