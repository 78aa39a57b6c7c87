"""Diffusion bridges (image-to-image): ``schedule`` (bridge schedules and time grids), ``denoiser`` (how a
bridge network is called), ``dbim`` (DBIM sampling, encoding, interpolation and the Bridge Sampler's choice),
``ddbm`` (DDBM Heun), ``checkpoints`` (presets and checkpoint files), ``adm_unet`` (the network),
``images`` (the bridge nodes' image preparation). Nothing is imported here: the network and einops load
only when a checkpoint is built."""
