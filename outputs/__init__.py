"""What a site writes to its output dir: models, metrics, predictions, plots and report."""
