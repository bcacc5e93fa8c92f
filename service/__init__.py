"""vae-serve's web service: a FastAPI app serving the model package's checkpoints (`create_app` in service.main),
and an httpx client for it (service.client). Importing this package loads neither torch nor FastAPI."""

__version__ = "0.1.0"
