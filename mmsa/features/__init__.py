"""Features of the pairs: the backbones (encoders), their cached token features, or batches read from the files (finetune=full), and the splits of them that training reads."""
