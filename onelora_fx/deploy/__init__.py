"""Deployment: ``merge`` folds every ``b`` into its weight, ``export`` writes the merged
graph as a ``torch.export`` program (``.pt2``)."""
