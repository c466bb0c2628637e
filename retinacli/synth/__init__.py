"""Synthetic paired fundus + OCT cohort with labels (`retina synth`). See docs/synthetic-cohort.md."""

from __future__ import annotations

from retinacli.synth.cohort import generate_cohort

__all__ = ["generate_cohort"]
