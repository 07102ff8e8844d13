"""facelens: shared vocabulary (attribute names, face geometry) for the whole toolkit."""
