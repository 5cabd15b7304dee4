"""Models and how they run: the heads, the one factory (create_model), full fine-tuning, the linear probe, and the final model as weighted members."""
