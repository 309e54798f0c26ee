"""How bytes become pictures: one module per kind of media (camera RAW here; Pillow images in `simsearch.images`)."""
