"""Ray jobs, one per stage, plus the end-to-end pipeline: thin shells over ``recsys``."""
