"""hydra-ray: train, tune and serve HYDRA (MoR + MoD + MoE language models) on Ray."""

__version__ = "0.1.0"
