"""The teacher cache: the store's layout and shards, its codecs, its identity, its reader and its summary."""
