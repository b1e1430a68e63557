"""Stage one: the teacher over every image's views, written shard by shard to the cache (locally or on dask)."""
