"""A stream's life: flush policy, the stream and its buffer, the registry, the reader."""
