"""Models: backbones (registry), their preprocessing, heads, and the one build path."""
