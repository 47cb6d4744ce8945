"""Ray Tune sweeps over experiment configs: ``recsys tune CONFIG`` (see ``tune.driver``).

The Ray-free parts (the sweep config, its search space, ranking, tables, plots and the winner's
config) live in ``recsys.sweep`` and ``recsys.sweep_report``; this package holds the Tuner, the
ASHA scheduler, the trial trainable and resume.
"""
