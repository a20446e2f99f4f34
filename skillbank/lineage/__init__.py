"""Refs, HEAD, reflog and walking the version DAG."""

from skillbank.lineage.head import Head, read_head, write_head
from skillbank.lineage.refs import (ancestors, check_name, create_ref, get_ref, log_move, move_branch,
                                    resolve)

__all__ = ["Head", "ancestors", "check_name", "create_ref", "get_ref", "log_move", "move_branch",
           "read_head", "resolve", "write_head"]
