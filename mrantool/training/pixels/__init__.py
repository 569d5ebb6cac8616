"""Training from pixels: end to end (e2e.py: encoder and head from bag pixels) and fine-tuning from the cache
(finetune.py). Both read pixels back from the slide files (source.py) and share the run folder of cached training
through mrantool.training.runs; nothing in mrantool.training imports this package."""
