"""Running a trained model: the engine, and running model-written code safely (execution, sandbox,
answer checks).
"""
