"""MAD backbones, sequence mixers and MLPs. Plain PyTorch: nothing here reads Hydra configs."""
