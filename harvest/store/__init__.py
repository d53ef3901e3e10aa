"""The activation store: one schema (format), the run folder (runfolder), building one shard
(shard), the background writer (writer), and the read side (reader, then chunks, stats, loader,
joined in api). A run folder is a local folder or an object-store URL: location (paths, local
files), objectstore (fsspec URLs) and lease (the lock on an object store) hide the difference.
`harvest.data` is the documented entry point for readers.

This package imports nothing on its own, so `harvest.store.format` stays a light import.
"""
