"""Cohort fixtures (owned by the synthetic-cohort work)."""
