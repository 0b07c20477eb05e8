"""What every layer uses: the one settings object (``WBC_*``), the class names, errors that
retrying cannot fix, "is this path inside those folders", retries with back-off, step work
folders with completion markers, parallel maps and file-name pseudonyms. Imports nothing else
of ``wbc_tasks``."""
