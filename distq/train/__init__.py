"""Training: the loop, its optimizer and schedules, checkpoints and logging."""
