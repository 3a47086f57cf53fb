"""Training the built-in TwoTower: an AR backbone, then the denoiser (spec §6.2)."""
