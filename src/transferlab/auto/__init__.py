"""``--strategy auto``: the search for the best strategy, backbone, resolution and head (see auto.search)."""
