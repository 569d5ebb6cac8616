"""Batched training: padded batches of slides, and several members (folds, sweep variants) stacked as one."""
