"""Semantic IDs: tokenizers behind one interface (RQ-VAE, hierarchical k-means), the index that
adds the collision level and the prefix trie, and the ID quality report."""

from recsys.semantic_ids.base import SemanticIdTokenizer, load_tokenizer, tokenizer_kinds, validate_embeddings
from recsys.semantic_ids.hkmeans import HierarchicalKMeans, HKMeansConfig, single_process_recursion
from recsys.semantic_ids.hkmeans_tree import (
    NodeSplit, SubtreeResult, SubtreeTask, assemble_tree, fit_subtree, make_subtree_tasks, split_node,
)
from recsys.semantic_ids.index import SemanticIdIndex, TrieTable
from recsys.semantic_ids.kmeans import (
    accumulate_centroids, assign_nearest, balanced_assign, faiss_kmeans, mean_centroids, node_seed,
)
from recsys.semantic_ids.report import id_quality, markdown_table, plot_code_usage, write_report
from recsys.semantic_ids.rqvae import (
    RQVAE, EpochStats, RQVAEConfig, RQVAETokenizer, RqVaeOutput, init_codebooks, reseed_dead_codes,
    reseed_dead_codes_synced, rqvae_epoch, shuffled_batches, train_rqvae,
)

__all__ = [
    "SemanticIdTokenizer", "load_tokenizer", "tokenizer_kinds", "validate_embeddings",
    "HierarchicalKMeans", "HKMeansConfig", "single_process_recursion",
    "NodeSplit", "SubtreeResult", "SubtreeTask", "assemble_tree", "fit_subtree", "make_subtree_tasks", "split_node",
    "SemanticIdIndex", "TrieTable",
    "accumulate_centroids", "assign_nearest", "balanced_assign", "faiss_kmeans", "mean_centroids", "node_seed",
    "id_quality", "markdown_table", "plot_code_usage", "write_report",
    "RQVAE", "EpochStats", "RQVAEConfig", "RQVAETokenizer", "RqVaeOutput", "init_codebooks", "reseed_dead_codes",
    "reseed_dead_codes_synced", "rqvae_epoch", "shuffled_batches", "train_rqvae",
]
