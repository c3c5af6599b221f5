"""Ray Serve application for HYDRA checkpoints (installed as hydra_ray.serve); lands with the serving issue."""
