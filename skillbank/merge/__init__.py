"""Chunked streaming merges: chains of task vectors, merge methods, the executor."""

from skillbank.merge.chain import MANIFEST_FORMAT, Chain, alpha_for, manifests_of, open_chain
from skillbank.merge.engine import AddStats, add_pass, blocks, materialize, rebuild_block
from skillbank.merge.methods import METHODS, register_method, retain

__all__ = ["AddStats", "Chain", "MANIFEST_FORMAT", "METHODS", "add_pass", "alpha_for", "blocks",
           "manifests_of", "materialize", "open_chain", "rebuild_block", "register_method", "retain"]
