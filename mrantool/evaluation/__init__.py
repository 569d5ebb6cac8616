"""Checks of what a trained model attends to, against annotations made by people."""
