"""What a model is, read from its graph: the linear ops, the sites, the head, the
LayerNorms that feed sites, every weight's readers, and the patterns that select sites.

Nothing here changes a module; the forms (:mod:`onelora_fx.forms`) act on what it finds.
"""
