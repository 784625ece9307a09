"""Training: the trainer loop and the shared math every model family uses (noise, losses, schedules, EMA)."""
