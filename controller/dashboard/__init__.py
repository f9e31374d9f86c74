"""The operator dashboard: read-only HTML pages over the controller, mounted at ``/dashboard``.

``queries.py`` (read model, SQL) -> ``pages.py`` (pure rendering, escaped) -> ``web.py`` (ASGI
app, authentication); ``session.py`` signs the login cookie. See docs/dashboard.md.
"""
