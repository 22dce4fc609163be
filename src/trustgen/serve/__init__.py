"""The HTTP server: OpenAI-compatible routes, continuous batching, the playground page."""
