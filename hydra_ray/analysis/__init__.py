"""hydra-ray analysis (see DESIGN.md)."""
