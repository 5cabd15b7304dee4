"""Training: fit one model; cross-validate a config."""
