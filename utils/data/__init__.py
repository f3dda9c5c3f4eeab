"""Image -> dataset: reading images and labels, augmenting, batching."""
