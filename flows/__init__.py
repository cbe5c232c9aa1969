"""Prefect flows of thumbnet-keras: thin shells over `thumbnet_keras.pipeline`."""
