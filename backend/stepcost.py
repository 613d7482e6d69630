"""What one decode step costs on this machine, learnt from the steps themselves, so that the
scheduler can tell whether finishing several prompts in one step or one after another gives
their first tokens sooner.

A step costs a fixed part (building and running the graph, one logits row per generating
sequence) plus a part per prompt token. k prompts of s tokens finished in one step all wait
F + k*s*c; finished one per step, the i-th waits i*(F + s*c). One after another wins on the mean
wait exactly when a prompt's own cost s*c exceeds F: eight clients' short questions over a shared
(cached) system prompt get their first tokens in turn instead of all at the end of one long step,
while eight prompts of a dozen tokens, cheaper than a step's fixed part, still share one.
"""

from __future__ import annotations

EMA = 0.2  # weight of the newest step: recent load (how many sequences generate) matters most
MIN_SAMPLE = 16  # prompt tokens a step needs before it says anything about their cost


class StepCosts:
    """Running estimates of a step's fixed cost and its cost per prompt token, in seconds.
    Owned by the scheduler thread."""

    def __init__(self) -> None:
        self.fixed: float | None = None
        self.per_token: float | None = None

    def record(self, seconds: float, prompt_tokens: int) -> None:
        if prompt_tokens == 0:
            self.fixed = seconds if self.fixed is None else self.fixed + EMA * (seconds - self.fixed)
        elif self.fixed is not None and prompt_tokens >= MIN_SAMPLE:
            cost = max(seconds - self.fixed, 0.0) / prompt_tokens
            self.per_token = cost if self.per_token is None else self.per_token + EMA * (cost - self.per_token)

    def prompt_group(self, limit: int) -> int:
        """Prompt tokens a step should hold before it finishes another prompt: those that cost
        about its fixed part. Until both are measured, `limit` (one batch: everything fits)."""
        if self.fixed is None or not self.per_token:
            return limit
        return max(1, min(limit, round(self.fixed / self.per_token)))
