"""Operations: retention of old work folders and MLflow artifacts, and failure alerts (webhook,
e-mail, callback). ``alerts`` uses the standard library and ``core`` only, since the DAG files
import it while the scheduler parses them. Imports every layer below ``pipelines``."""
