"""Neural-network building blocks of the Mamba-ASR recipes."""
