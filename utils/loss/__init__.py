"""Training losses, one per head kind."""
