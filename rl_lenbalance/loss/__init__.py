"""The loss phase's forwards and their planners, framework-free (torch and transformers only, no TRL import)."""

from .shared_prompt import (plan_shared_prompt, prompt_groups, shared_prompt_logps_and_entropies,
                            shared_prompt_unsupported)

__all__ = ["plan_shared_prompt", "prompt_groups", "shared_prompt_logps_and_entropies", "shared_prompt_unsupported"]
