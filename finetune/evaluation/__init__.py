"""Run on the host against served models: `invoke eval` (evaluate.py, report.py: the questions, the metrics,
the gate, the report) and `invoke families` (families.py: every chat-template family trained, converted and
served, its prompts and token ids compared)."""
