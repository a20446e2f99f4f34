"""Content-addressed storage of weights, task vectors and manifests."""

from skillbank.store.objects import ObjectStore, ObjectWriter, hash_file

__all__ = ["ObjectStore", "ObjectWriter", "hash_file"]
