"""Data for gan-bench: the built-in dataset, WebDataset shard sets and the read pipeline.

    format.py   DataError, the shard format's names, PNG encoding and the centre-crop resize
    shapes.py   the built-in procedural dataset ("shapes")
    writer.py   writing a shard set (shapes, an image folder or an importer's records) into a temp dir, then
                publishing it
    importers.py  readers of npz, CIFAR pickles, HDF5, LMDB and torchvision datasets for make-shards
    shards.py   shard specs and manifests, `make_shards`, the built-in shard cache, shard identity
    loader.py   `ShardLoader`: reading split by rank and worker, decoding, data.mirror's flips, batching

See docs/architecture.md ("The rooms").
"""
