"""Chunked streaming merges: chains of task vectors, merge methods, the executor."""

from skillbank.merge.chain import MANIFEST_FORMAT, Chain, alpha_for, manifests_of, open_chain
from skillbank.merge.engine import AddStats, Options, add_pass, materialize, rebuild_piece, resolve_device
from skillbank.merge.plan import blocks, block_view, plan
from skillbank.merge.methods import METHODS, register_method, retain

__all__ = ["AddStats", "Chain", "MANIFEST_FORMAT", "METHODS", "Options", "add_pass", "alpha_for",
           "block_view", "blocks", "manifests_of", "materialize", "open_chain", "plan", "rebuild_piece",
           "register_method", "resolve_device", "retain"]
