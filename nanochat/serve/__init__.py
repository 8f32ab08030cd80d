"""Serving a model over HTTP (stage chat-web): the request schema (api), generation in worker
threads (pool), the OpenAI-shaped answers (reply), the FastAPI application (app), request
guards (http_guard) and the chat page (index.html).
"""
