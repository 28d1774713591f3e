"""Tools of the studies: long-context evaluation (:mod:`.long_context`), sweeps (:mod:`.sweep`) and
the eta probe (:mod:`.eta_probe`)."""
