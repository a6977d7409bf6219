"""Data set builders: real QA sets from ``../shared/data`` (:mod:`.converters`, :mod:`.general`)
and the synthetic fictional-entity corpus (:mod:`.synthetic`)."""
