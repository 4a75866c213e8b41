"""Training: the loop and its events, callbacks, strategies, and the staged trainer."""
