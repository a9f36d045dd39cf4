"""Auditing what an endpoint serves: statistical tests of whether a target model's outputs are
distributed as a reference's (cousins/audit/stats.py)."""
