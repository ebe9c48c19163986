"""Training: segments with truncated back-propagation, settings, data streams, the trainer and its run loop."""
