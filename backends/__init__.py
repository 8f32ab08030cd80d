"""Where and how a stage runs: the stage table, presets, knobs, and the backends.

Everything in this package imports with the standard library alone (plus ``invoke`` in
tasks.py), so a laptop that only launches remote runs never needs torch.
"""
