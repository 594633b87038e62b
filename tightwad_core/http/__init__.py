"""The HTTP edge: the Quart app and its server (`app`, `server`), the OpenAI
and Ollama routes (`openai`, `ollama`) with what they share (`common`), the
shared upstream client for OpenAI-compatible servers (`upstream`, `wire`)
and Prometheus metrics (`metrics`)."""
