"""What every trainer shares: the optimizer, the training loop, checkpoints and the per-tag run
lock.
"""
