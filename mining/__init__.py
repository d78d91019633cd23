"""Mining: a web crawl (image, source URL, alt text) -> subject clusters with unseen creative
prompts (the input of the expert generation job, :mod:`generation`).

* :mod:`mining.crawl`: read webdataset shards, image folders, JSONL/parquet manifests;
* :mod:`mining.embed`: CLIP embeddings of images and alt texts (in-process or Ray Data);
* :mod:`mining.cluster`: per-page clusters, de-duplicated, outliers removed, CLIP-filtered;
  ``clusters.jsonl`` is read back by :func:`mining.cluster.read_clusters`;
* :mod:`mining.prompts`: unseen prompts over the four SuTI skills at levels 1-3, class nouns;
* :mod:`mining.photos`: clusters' photos as the apprentice's training shards (``suti apprentice pack-photos``);
* :mod:`mining.cli`: ``suti mine``; :mod:`mining.evaluate`: purity/recall on world crawls.
"""
