"""Hydra configuration package (YAML files are shipped as package data)."""
