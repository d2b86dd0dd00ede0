"""Refusal directions, interventions and safety experiments on robot policies.

For now this package holds the testbed's validity check (:mod:`embodied.oracle_check`); direction extraction,
interventions and the experiment runner build on it.
"""
