"""Running a trained model (chat CLI, web server, chat evals, RL rollouts): the engine (KV
cache, sampling, the calculator tool), fitting a conversation into the context (prompt_fit),
and running model-written code safely (execution, sandbox, answer_check).
"""
