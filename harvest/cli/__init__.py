"""The command line: `harvest run CONFIG` (also `python -m harvest.run CONFIG`).

config (the YAML tree) -> pipeline (prepare, the generation stream, the summary) -> records (a prompt
plus one generated row becomes a stored sequence); main owns argparse, errors and the report.
"""
