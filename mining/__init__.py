"""Mining: a web crawl (image, source URL, alt text) -> subject clusters with unseen creative
prompts, and the expert generation job that turns clusters into training shards.

* :mod:`mining.crawl`: read webdataset shards, image folders, JSONL/parquet manifests;
* :mod:`mining.embed`: CLIP embeddings of images and alt texts (in-process or Ray Data);
* :mod:`mining.cluster`: per-page clusters, de-duplicated, outliers removed, CLIP-filtered;
* :mod:`mining.prompts`: unseen prompts over the four SuTI skills at levels 1-3, class nouns;
* :mod:`mining.cli`: ``suti mine``; :mod:`mining.evaluate`: purity/recall on world crawls;
* :mod:`mining.generate`: ``suti generate``, one expert per cluster on Ray.
"""
