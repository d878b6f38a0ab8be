"""The `stacked` Hydra launcher of mad.run: trains the lr x weight-decay grid of each task setting as one stack."""
