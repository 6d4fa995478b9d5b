"""Wire formats as pure encoders/decoders: no I/O, table-tested."""
