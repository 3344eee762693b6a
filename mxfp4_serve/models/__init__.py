"""Model classes the plugin registers with vLLM (loaded lazily by vLLM's ModelRegistry)."""
