"""The index on disk: the SQLite + FAISS store (crash-safe, one writer) and the folder sync that feeds it."""
