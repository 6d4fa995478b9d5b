"""FastAPI app and routes: validate, hand to streaming, encode. Never formats wire bytes."""
