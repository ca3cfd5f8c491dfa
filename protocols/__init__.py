"""Built-in cleihc protocols (the TOML files in this folder), shipped as package data."""
