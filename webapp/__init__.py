"""The LLM gateway: an OpenAI-compatible chat completions API with a built-in mock provider."""
