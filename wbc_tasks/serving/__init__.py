"""Nightly classification: scan the drop folders, plan chunks, infer with a registered model,
commit rows per chunk, summarise the night; and the predictions database (schema, migrations,
export). Imports ``core``, ``data``, ``training`` and ``registry``."""
