"""Files: atomic writes, checkpoints in safetensors + JSON, the Hugging Face Hub mixin."""
