"""gradio lives only here: the page (page.py) and its tabs (tabs/), what they share (widgets.py, common.py),
the named API endpoints (api.py), the server (server.py) and the rate limit (ratelimit.py)."""

import os

# Read by gradio when it is imported and when an app launches; an operator may still set it to True.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
