"""Cohorts made or found for users and benchmarks: the classical MIL sets (`classical`)."""
