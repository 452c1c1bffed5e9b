"""Built-in data files shipped with the package (``tiny.jsonl``) and the script that generates them."""
