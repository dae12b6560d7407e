"""The page's tabs, one module each; web/page.py composes them."""
