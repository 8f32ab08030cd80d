"""What the test modules share besides fixtures (those live in tests/conftest.py): builders of tiny
tokenizers, models and checkpoints (builders), the pretraining command (pretrain), a trainer
stopped by SIGTERM (stopping), the hub stand-ins (hub), chat-web servers (chat_server), the sandbox
probes' verdicts (sandbox) and polling (waiting). Imported as ``from helpers.builders import ...``:
pytest puts tests/ on sys.path, as it does for ``from conftest import ...``."""
