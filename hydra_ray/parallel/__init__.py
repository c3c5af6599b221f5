"""How the model is spread over workers, applied from outside the model."""
