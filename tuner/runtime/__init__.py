"""What a run is made of beyond the model and data: the checkpoints' and exports' lifecycle, the output folder's
lock, scaling (DDP, FSDP, DeepSpeed) and clusters (SLURM), start-up, the console, and sweeps."""
