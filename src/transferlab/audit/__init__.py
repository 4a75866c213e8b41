"""The data audit: label issues, duplicates, learning curves and data health, from cached frozen features."""
