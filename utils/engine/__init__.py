"""Training engine: optimizer, schedules, EMA, the epoch loop, results logging."""
