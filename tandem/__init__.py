"""`tandem.v1`: the wire API, generated from `protos/tandem/v1/*.proto` by `python -m protos.generate`
(the Makefile's `proto` target). Nothing hand-written lives in this package; `tandem/v1/` is git-ignored."""
