"""Rules and data: catalog, generation settings, prompts, images, load decisions. No torch, no gradio."""
