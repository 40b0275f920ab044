"""What users add to a model: textual inversion embeddings and LoRA."""
