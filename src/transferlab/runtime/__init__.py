"""How models run: the precision and device policy, inference engines and test-time augmentation."""
