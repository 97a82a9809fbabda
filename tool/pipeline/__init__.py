"""The whole pipeline in one command (runner, `python -m tool.pipeline`, what run_pipeline.sh
runs): each stage script as a child process, one run folder, the summary table, the contact sheet
(contact_sheet). Imports every other tool subpackage.
"""
