"""nanochat: the library behind every stage (data, tokenizer, model, optimizer, engine, evals).

Importing the package imports nothing heavy; each module pulls in what it needs, so the
orchestration layer can use the light modules (for example ``nanochat.common``) without torch.
"""
