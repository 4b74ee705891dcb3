"""The report format version: bump it when tables, figures or the page change, so cached runs re-render."""

REPORT_VERSION = 6
