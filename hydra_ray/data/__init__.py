"""hydra-ray data (see DESIGN.md)."""
