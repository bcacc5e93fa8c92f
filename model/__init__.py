"""vae-serve's model package: the VAE, its likelihoods, the checkpoint format, dataset readers and the offline
training and evaluation CLIs. Pure PyTorch; never imports the web service."""

__version__ = "0.1.0"
