"""FastAPI edge: sessions REST, seed-compatible routes, tokens, health, debug, metrics."""
