"""Helpers the passes share (not passes themselves): graph rewriting that keeps protected names."""
