"""Serving a model over HTTP: request guards and the chat page."""
