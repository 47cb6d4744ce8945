"""A user's whole history, for the ranking stage: hierarchical clustering into virtual items."""

from recsys.history.clustering import VirtualItems, cluster_history

__all__ = ["VirtualItems", "cluster_history"]
