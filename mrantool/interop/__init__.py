"""Feature and annotation formats of other tools: CLAM / TRIDENT / STAMP h5 in and out, QuPath GeoJSON out."""
