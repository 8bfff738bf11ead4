"""Fetching: the pull plan, the fetcher, and large blobs fetched in pieces."""
