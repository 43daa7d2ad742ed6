"""KCL record processors that project the event stream into the read models."""
