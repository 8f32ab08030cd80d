"""Scoring models (stages base-eval, chat-eval, and the evals inside training): bits per byte
(loss_eval), CORE (core_eval over a bundle: eval_bundle is its format, bundle_fetch gets it in
place), the chat benchmarks and ChatCORE (chat_eval), and greedy samples of a base model
(samples).
"""
