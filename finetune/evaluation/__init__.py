"""`invoke eval`, run on the host against the serve container: the questions, the metrics, the gate, the report."""
