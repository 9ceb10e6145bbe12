"""Pure helpers: atomic file writes, image I/O, device and dtype resolution."""
