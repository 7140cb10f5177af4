"""Plain-Python reference models of Rust components, for differential tests only."""
