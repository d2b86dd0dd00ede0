"""Defenses evaluated under the attacks: an action shield, an activation monitor, refusal adversarial training,
and the refusal-rank analysis."""
