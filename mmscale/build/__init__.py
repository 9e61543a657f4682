"""The offline side of data: raw readers with the bad-input ledger, the shard builder, the generated default world and
MP4SR feature extraction. They write what mmscale.data reads."""
