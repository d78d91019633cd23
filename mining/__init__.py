"""Mining: a web crawl (image, source URL, alt text) -> subject clusters with unseen creative
prompts. (Not built yet: issue 4.)"""
