"""Data: raw readers, shard builder, item store, WebDataset stream, the generated default world."""
