"""The OpenAI-compatible server: engine.py (continuous batching over slots.py), app.py (HTTP),
static/ (the chat page), cli.py (`qwen2vl serve`). Importing this package imports no web
framework; app.py and cli.py import FastAPI and uvicorn when used."""
