"""Chat semantics that every mode shares: tool calls in a model's own markup
(`tools`) and fitting a conversation into a context (`truncate`)."""
