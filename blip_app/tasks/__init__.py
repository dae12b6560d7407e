"""What the app does, without gradio: the service (caption, answer, chat), batch captioning, side by
side, conversation exports."""
