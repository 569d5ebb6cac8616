"""Executors run extraction locally or on a Ray cluster behind one interface (see base.py)."""
