"""The base layer every stage uses: one-line user errors, declared settings, the training config, every read
and write by URL, the output guard, and the console and output files."""
