"""The report of an experiment: tables, Markdown, charts and the self-contained report.html. It reads
what :mod:`transferlab.experiment` left on disk; nothing there imports the report."""
