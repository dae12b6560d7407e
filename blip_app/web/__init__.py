"""gradio lives only here: the page, its tabs, the named API endpoints and the rate limit."""
