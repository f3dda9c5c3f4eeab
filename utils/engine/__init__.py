"""Training engine: optimizer, schedules, EMA, the epoch loop, results logging; and validation.py, what val.py runs."""
