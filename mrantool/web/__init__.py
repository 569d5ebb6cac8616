"""The browser viewer: a Starlette app with OpenSeadragon, Deep Zoom tiles, attention overlays, similar patches."""
