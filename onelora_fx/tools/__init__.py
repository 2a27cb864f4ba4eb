"""Outside the core: the ``onelora-fx`` command (:mod:`.cli`), its demo (:mod:`.demo`)
and the tiny model configs it and the tests use (:mod:`.zoo`)."""
