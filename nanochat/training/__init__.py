"""Training (stages pretrain, midtrain, SFT, RL): the optimizer (optim), the one training loop
and its Trainer hooks (train_loop), a run's state around it (run_state: seed, wandb, save,
resume, warm start), checkpoints (checkpoint: files, kinds, find and load) and the per-tag run
lock (run_lock); midtraining and SFT themselves (chat_stage).
"""
