"""The command line's commands (python -m blip_app)."""
