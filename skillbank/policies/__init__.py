"""Policies skillbank can train itself.

Only the small reference policy lives here; big families (pi0, SmolVLA) are trained elsewhere and
come in through `add-skill --finetuned` or an external trainer command.
"""

from skillbank.policies.reference import (
    POLICY_TYPE,
    RefPolicy,
    RefPolicyConfig,
    embed_instructions,
    register_text_encoder,
)

__all__ = ["POLICY_TYPE", "RefPolicy", "RefPolicyConfig", "embed_instructions", "register_text_encoder"]
