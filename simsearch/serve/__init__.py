"""`simsearch serve`: an HTTP API and a web page over one index (FastAPI is imported only by `app`)."""
