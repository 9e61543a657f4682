"""The runtime side of data: the shard format, ShardSet (a shard folder opened once), the item store, the WebDataset
stream, the catalogue loader, feature files and shard inspection. What writes shards is mmscale.build."""
