"""cacert-signer: the offline signer of a community CA."""

__version__ = "0.1.0"
