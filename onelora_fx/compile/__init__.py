"""``torch.compile(model, backend="onelora")`` (:mod:`.backend`)."""
