"""The data path's first stage: discover classes and splits, split, decode (no torch below images.py)."""
