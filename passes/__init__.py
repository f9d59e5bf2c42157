"""Graph -> graph passes, one concern per file (installed as graphc.passes)."""
