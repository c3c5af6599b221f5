"""hydra-ray train (see DESIGN.md)."""
