"""Flow-of-flows: validation, conversion from the original format, and the DAG."""
