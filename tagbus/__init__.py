"""tagbus: the composition root — settings, the ``tagbus`` CLI and the local stack."""
