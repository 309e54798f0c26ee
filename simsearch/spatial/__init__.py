"""Local features and geometry: spatial re-ranking of search results and geometric confirmation of duplicates."""
